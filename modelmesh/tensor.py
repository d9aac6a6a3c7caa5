"""Transport-neutral tensors: what runtimes consume and produce.

The codec (``modelmesh.codec``) turns V2 protobuf tensors into these and back;
runtimes never see protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# A request or tensor parameter as passed through to a runtime.
ParamValue = bool | int | float | str
Parameters = Mapping[str, ParamValue]


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named, typed n-d array. ``datatype`` is the V2 name (FP32, BYTES, ...).

    For BYTES the array has dtype ``object`` holding ``bytes`` elements. For BF16
    the array holds float32 values (widened losslessly on decode).
    """

    name: str
    datatype: str
    data: np.ndarray
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Declared input or output of a model; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
