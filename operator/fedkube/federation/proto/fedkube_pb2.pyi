from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("index", "site_replica")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SITE_REPLICA_FIELD_NUMBER: _ClassVar[int]
    index: int
    site_replica: int
    def __init__(self, index: _Optional[int] = ..., site_replica: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "spec_json", "index")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    spec_json: str
    index: int
    def __init__(self, client_id: _Optional[str] = ..., spec_json: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("wait_seconds",)
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    def __init__(self, wait_seconds: _Optional[float] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("action", "round", "proximal_mu", "tensors")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[TaskHeader.Action]
        TRAIN: _ClassVar[TaskHeader.Action]
        FINISHED: _ClassVar[TaskHeader.Action]
        EVALUATE: _ClassVar[TaskHeader.Action]
    WAIT: TaskHeader.Action
    TRAIN: TaskHeader.Action
    FINISHED: TaskHeader.Action
    EVALUATE: TaskHeader.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    action: TaskHeader.Action
    round: int
    proximal_mu: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, action: _Optional[_Union[TaskHeader.Action, str]] = ..., round: _Optional[int] = ..., proximal_mu: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "num_examples", "metrics", "tensors")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushUpdateReply(_message.Message):
    __slots__ = ("status", "reason")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACCEPTED: _ClassVar[PushUpdateReply.Status]
        REJECTED: _ClassVar[PushUpdateReply.Status]
        LATE: _ClassVar[PushUpdateReply.Status]
    ACCEPTED: PushUpdateReply.Status
    REJECTED: PushUpdateReply.Status
    LATE: PushUpdateReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: PushUpdateReply.Status
    reason: str
    def __init__(self, status: _Optional[_Union[PushUpdateReply.Status, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("round", "num_examples", "loss", "accuracy")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_examples: int
    loss: float
    accuracy: float
    def __init__(self, round: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class PushEvaluationReply(_message.Message):
    __slots__ = ("status",)
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACCEPTED: _ClassVar[PushEvaluationReply.Status]
        LATE: _ClassVar[PushEvaluationReply.Status]
    ACCEPTED: PushEvaluationReply.Status
    LATE: PushEvaluationReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: PushEvaluationReply.Status
    def __init__(self, status: _Optional[_Union[PushEvaluationReply.Status, str]] = ...) -> None: ...
