from modelmesh._proto.mmesh import model_mesh_pb2 as _model_mesh_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "prefix", "include_status")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATUS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    prefix: str
    include_status: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., prefix: _Optional[str] = ..., include_status: _Optional[bool] = ...) -> None: ...

class ListedModel(_message.Message):
    __slots__ = ("modelId", "modelInfo", "status", "autoDelete")
    MODELID_FIELD_NUMBER: _ClassVar[int]
    MODELINFO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUTODELETE_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    modelInfo: _model_mesh_pb2.ModelInfo
    status: _model_mesh_pb2.ModelStatusInfo
    autoDelete: bool
    def __init__(self, modelId: _Optional[str] = ..., modelInfo: _Optional[_Union[_model_mesh_pb2.ModelInfo, _Mapping]] = ..., status: _Optional[_Union[_model_mesh_pb2.ModelStatusInfo, _Mapping]] = ..., autoDelete: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token", "total")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ListedModel]
    next_page_token: str
    total: int
    def __init__(self, models: _Optional[_Iterable[_Union[ListedModel, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class RegisterModelsRequest(_message.Message):
    __slots__ = ("requests", "replace")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[_model_mesh_pb2.RegisterModelRequest]
    replace: bool
    def __init__(self, requests: _Optional[_Iterable[_Union[_model_mesh_pb2.RegisterModelRequest, _Mapping]]] = ..., replace: _Optional[bool] = ...) -> None: ...

class RegisterResult(_message.Message):
    __slots__ = ("modelId", "code", "message")
    MODELID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    code: int
    message: str
    def __init__(self, modelId: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RegisterModelsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RegisterResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RegisterResult, _Mapping]]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("instanceId", "endpoint", "capacityBytes", "usedBytes", "modelCount", "lruTimeMs", "shuttingDown", "version", "labels", "loadingCount", "requestsPerMinute", "inFlight")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCEID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CAPACITYBYTES_FIELD_NUMBER: _ClassVar[int]
    USEDBYTES_FIELD_NUMBER: _ClassVar[int]
    MODELCOUNT_FIELD_NUMBER: _ClassVar[int]
    LRUTIMEMS_FIELD_NUMBER: _ClassVar[int]
    SHUTTINGDOWN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LOADINGCOUNT_FIELD_NUMBER: _ClassVar[int]
    REQUESTSPERMINUTE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    instanceId: str
    endpoint: str
    capacityBytes: int
    usedBytes: int
    modelCount: int
    lruTimeMs: int
    shuttingDown: bool
    version: str
    labels: _containers.ScalarMap[str, str]
    loadingCount: int
    requestsPerMinute: float
    inFlight: int
    def __init__(self, instanceId: _Optional[str] = ..., endpoint: _Optional[str] = ..., capacityBytes: _Optional[int] = ..., usedBytes: _Optional[int] = ..., modelCount: _Optional[int] = ..., lruTimeMs: _Optional[int] = ..., shuttingDown: _Optional[bool] = ..., version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., loadingCount: _Optional[int] = ..., requestsPerMinute: _Optional[float] = ..., inFlight: _Optional[int] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("instances", "models", "vmodels")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VMODELS_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    models: int
    vmodels: int
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ..., models: _Optional[int] = ..., vmodels: _Optional[int] = ...) -> None: ...
