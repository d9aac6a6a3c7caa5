"""The mesh's exception hierarchy, free of any transport.

Domain code raises these; only the transports turn them into statuses, through
the one table in ``modelmesh.api.status``. Messages are written for the user:
they name the model, the input or the field at fault and say what to do.

``Code`` names the canonical status codes (gRPC's numbering, which HTTP
gateways map too); it appears here only for ``UpstreamError``, the error of a
peer instance or a runtime server that is passed on with the code it gave.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """The canonical status codes, numbered as gRPC numbers them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class MeshError(Exception):
    """Base of every error the mesh reports to a client.

    ``transient``: the failure may pass on its own (no room right now, a store
    that is unreachable): a load that failed so is retried by the next request
    instead of being remembered as the model's failure.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class InvalidArgument(MeshError):
    """The request is malformed: bad tensor, bad field, bad path."""


class ModelNotFound(MeshError):
    def __init__(self, model_id: str, what: str = "model", *, message: str = "") -> None:
        super().__init__(message or f"{what} '{model_id}' is not registered")
        self.model_id = model_id


class VModelNotFound(ModelNotFound):
    def __init__(self, vmodel_id: str) -> None:
        super().__init__(vmodel_id, what="vmodel")


class NotLoaded(ModelNotFound):
    """A runtime server holds no such model (the mesh loads it again and retries)."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id, message=f"model '{model_id}' is not loaded in this runtime")


class AlreadyExists(MeshError):
    pass


class PreconditionFailed(MeshError):
    """A compare-and-set precondition did not hold (e.g. expectedTargetModelId)."""


class ModelLoadFailed(MeshError):
    """The model could not be loaded; its status is LOADING_FAILED with this reason."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"model '{model_id}' failed to load: {reason}")
        self.model_id = model_id
        self.reason = reason


class RequestTooLarge(MeshError):
    """A request (its body, or what it decompresses to) is larger than the mesh accepts."""


class CapacityExceeded(MeshError):
    """Too large for this instance, or no room can be made right now (``transient``)."""


class StorageError(MeshError):
    """A model's files could not be fetched: not found, access denied, unreachable, corrupt.

    The model becomes LOADING_FAILED with this message. ``transient`` failures
    (unreachable, timed out) may use a copy already in the local disk cache.
    """


class Unavailable(MeshError):
    """A dependency (etcd, a peer, a runtime) is unreachable; the client may retry."""


class Rejected(Unavailable):
    """This instance will not take the work (it is draining); a forwarder tries another."""


class Unimplemented(MeshError):
    pass


class Unauthenticated(MeshError):
    """No credential, or one the mesh does not know (``--auth-file``)."""


class PermissionDenied(MeshError):
    """A known credential without the role the call needs."""


class UpstreamError(MeshError):
    """A peer instance's or a runtime server's non-OK answer, passed on with its code."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
