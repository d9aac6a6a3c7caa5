"""How a model's use is summarised for placement: a decayed rate and two times.

The caller (the mesh's request path, the simulator) keeps, per model, the
``last_used`` time, the ``earlier_use`` time and the decayed ``request_rate``,
and updates all three on every request with the functions below. They are the
``ModelSnapshot`` fields of the same names.

The rate is an exponentially decayed count with half-life ``RATE_HALF_LIFE_S``,
expressed in requests per second: a model requested steadily at r per second
converges to r; one that stops being requested halves every half-life.
"""

from __future__ import annotations

import math

#: Half-life of the decayed request rate, in seconds.
RATE_HALF_LIFE_S = 900.0

#: A pause in a model's traffic at least this long starts a new "use"; the use
#: before it becomes ``earlier_use``. Equal to ModelMesh's rate-check period.
REUSE_GAP_S = 10.0

_LN2 = math.log(2.0)
_RATE_PER_COUNT = _LN2 / RATE_HALF_LIFE_S


def decayed_rate(rate: float, as_of: float | None, now: float) -> float:
    """The rate ``rate`` measured at ``as_of``, decayed to ``now``."""
    if as_of is None or rate <= 0.0:
        return 0.0
    if now <= as_of:
        return rate
    return rate * math.exp(-(now - as_of) * _RATE_PER_COUNT)


def rate_after_request(rate: float, last_used: float | None, now: float) -> float:
    """The decayed rate just after one more request at ``now``."""
    return decayed_rate(rate, last_used, now) + _RATE_PER_COUNT


def earlier_use_after_request(
    last_used: float | None, earlier_use: float | None, now: float
) -> float | None:
    """``earlier_use`` after a request at ``now``: the previous use if a pause just ended."""
    if last_used is not None and now - last_used >= REUSE_GAP_S:
        return last_used
    return earlier_use
