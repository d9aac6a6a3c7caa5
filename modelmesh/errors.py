"""The mesh's exception hierarchy and its one mapping onto gRPC status codes.

Domain code raises these; only the API layer turns them into gRPC statuses
(``status_for``). Messages are written for the user: they name the model, the
input or the field at fault and say what to do.
"""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """Base of every error the mesh reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    """The request is malformed: bad tensor, bad field, bad path."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model_id: str, what: str = "model") -> None:
        super().__init__(f"{what} '{model_id}' is not registered")
        self.model_id = model_id


class VModelNotFound(ModelNotFound):
    def __init__(self, vmodel_id: str) -> None:
        super().__init__(vmodel_id, what="vmodel")


class AlreadyExists(MeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PreconditionFailed(MeshError):
    """A compare-and-set precondition did not hold (e.g. expectedTargetModelId)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelLoadFailed(MeshError):
    """The model could not be loaded; its status is LOADING_FAILED with this reason."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"model '{model_id}' failed to load: {reason}")
        self.model_id = model_id
        self.reason = reason


class CapacityExceeded(MeshError):
    """Too large for this instance, or no room can be made right now."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StorageError(MeshError):
    """A model's files could not be fetched: not found, access denied, unreachable, corrupt.

    The model becomes LOADING_FAILED with this message. ``transient`` marks
    failures that may pass on their own (unreachable, timed out), for which a
    copy already in the local disk cache may be used instead.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Unavailable(MeshError):
    """A dependency (etcd, a peer, a runtime) is unreachable; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Rejected(Unavailable):
    """This instance will not take the work (it is draining); a forwarder tries another."""


class Unimplemented(MeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (status code, message); unknown ones become INTERNAL."""
    if isinstance(exc, MeshError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
