"""How the instance's etcd writes are paced (``modelmesh.membership._paced``).

A change after a quiet spell is gathered ``COPY_GATHER_S``; under sustained change
writes are at least ``BUSY_GAP_S`` apart. Only lower bounds are asserted: a sleep
never ends early, however busy the machine.
"""

from __future__ import annotations

import time

from modelmesh.membership import BUSY_GAP_S, COPY_GATHER_S, _paced

# asyncio may wake a timer up to its clock's resolution early.
SLACK = 0.001


async def test_a_change_after_a_quiet_spell_waits_only_the_gather() -> None:
    began = time.monotonic()
    await _paced(began - 10 * BUSY_GAP_S)  # the last write long ago
    assert time.monotonic() - began >= COPY_GATHER_S - SLACK


async def test_writes_under_sustained_change_are_a_busy_gap_apart() -> None:
    written = time.monotonic()
    await _paced(written)  # a write just went out: the next waits the busy gap
    assert time.monotonic() - written >= BUSY_GAP_S - SLACK
    assert BUSY_GAP_S > COPY_GATHER_S
