from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "wire_dtype")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    wire_dtype: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("uid", "tensors", "compression", "call_id")
    UID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    compression: str
    call_id: str
    def __init__(self, uid: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., compression: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class ExpertReply(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class ExpertBatch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ExpertRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ExpertRequest, _Mapping]]] = ...) -> None: ...

class PartStatus(_message.Message):
    __slots__ = ("code", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class ExpertBatchReply(_message.Message):
    __slots__ = ("replies", "statuses")
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[ExpertReply]
    statuses: _containers.RepeatedCompositeFieldContainer[PartStatus]
    def __init__(self, replies: _Optional[_Iterable[_Union[ExpertReply, _Mapping]]] = ..., statuses: _Optional[_Iterable[_Union[PartStatus, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("uid", "expert_cls", "hidden_dim", "inputs", "outputs", "num_parameters", "updates")
    UID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CLS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    uid: str
    expert_cls: str
    hidden_dim: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_parameters: int
    updates: int
    def __init__(self, uid: _Optional[str] = ..., expert_cls: _Optional[str] = ..., hidden_dim: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_parameters: _Optional[int] = ..., updates: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("experts", "node_id")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    node_id: str
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., node_id: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("node_id", "time", "load", "num_experts")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    time: float
    load: float
    num_experts: int
    def __init__(self, node_id: _Optional[str] = ..., time: _Optional[float] = ..., load: _Optional[float] = ..., num_experts: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("uid", "round")
    UID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    uid: str
    round: int
    def __init__(self, uid: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("uid", "expert_cls", "hidden_dim", "updates", "weight", "round", "size", "sha256")
    UID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CLS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    uid: str
    expert_cls: str
    hidden_dim: int
    updates: int
    weight: float
    round: int
    size: int
    sha256: str
    def __init__(self, uid: _Optional[str] = ..., expert_cls: _Optional[str] = ..., hidden_dim: _Optional[int] = ..., updates: _Optional[int] = ..., weight: _Optional[float] = ..., round: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class AdoptRequest(_message.Message):
    __slots__ = ("uid", "source")
    UID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    uid: str
    source: str
    def __init__(self, uid: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AdoptReply(_message.Message):
    __slots__ = ("accepted", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
