from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoutingStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RouteArm(_message.Message):
    __slots__ = ("version", "weight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: float
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class CanaryStatus(_message.Message):
    __slots__ = ("version", "weight", "step", "state", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: float
    step: int
    state: str
    reason: str
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[float] = ..., step: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class OutputAgreement(_message.Message):
    __slots__ = ("compared", "max_abs_diff", "mean_max_abs_diff", "mismatched", "top1_rows", "top1_agreed")
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MEAN_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    TOP1_ROWS_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREED_FIELD_NUMBER: _ClassVar[int]
    compared: int
    max_abs_diff: float
    mean_max_abs_diff: float
    mismatched: int
    top1_rows: int
    top1_agreed: int
    def __init__(self, compared: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., mean_max_abs_diff: _Optional[float] = ..., mismatched: _Optional[int] = ..., top1_rows: _Optional[int] = ..., top1_agreed: _Optional[int] = ...) -> None: ...

class ShadowStatus(_message.Message):
    __slots__ = ("version", "fraction", "sent", "dropped", "errors", "compared", "outputs")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: OutputAgreement
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[OutputAgreement, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    fraction: float
    sent: int
    dropped: int
    errors: int
    compared: int
    outputs: _containers.MessageMap[str, OutputAgreement]
    def __init__(self, version: _Optional[str] = ..., fraction: _Optional[float] = ..., sent: _Optional[int] = ..., dropped: _Optional[int] = ..., errors: _Optional[int] = ..., compared: _Optional[int] = ..., outputs: _Optional[_Mapping[str, OutputAgreement]] = ...) -> None: ...

class ModelRouting(_message.Message):
    __slots__ = ("name", "versions", "arms", "sticky_header", "sticky_parameter", "canary", "shadow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    STICKY_HEADER_FIELD_NUMBER: _ClassVar[int]
    STICKY_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    arms: _containers.RepeatedCompositeFieldContainer[RouteArm]
    sticky_header: str
    sticky_parameter: str
    canary: CanaryStatus
    shadow: ShadowStatus
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., arms: _Optional[_Iterable[_Union[RouteArm, _Mapping]]] = ..., sticky_header: _Optional[str] = ..., sticky_parameter: _Optional[str] = ..., canary: _Optional[_Union[CanaryStatus, _Mapping]] = ..., shadow: _Optional[_Union[ShadowStatus, _Mapping]] = ...) -> None: ...

class RoutingStatusResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRouting]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRouting, _Mapping]]] = ...) -> None: ...

class DriftStatusRequest(_message.Message):
    __slots__ = ("name", "version", "top")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    top: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., top: _Optional[int] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("io", "tensor", "feature", "method", "score", "alert")
    IO_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    io: str
    tensor: str
    feature: str
    method: str
    score: float
    alert: bool
    def __init__(self, io: _Optional[str] = ..., tensor: _Optional[str] = ..., feature: _Optional[str] = ..., method: _Optional[str] = ..., score: _Optional[float] = ..., alert: _Optional[bool] = ...) -> None: ...

class ModelDrift(_message.Message):
    __slots__ = ("name", "version", "method", "threshold", "window", "window_fill", "min_rows", "sample_fraction", "alert", "last_update_unix_seconds", "requests", "sampled", "dropped", "rows", "features", "top", "scored_rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FILL_FIELD_NUMBER: _ClassVar[int]
    MIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SCORED_ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    method: str
    threshold: float
    window: int
    window_fill: int
    min_rows: int
    sample_fraction: float
    alert: bool
    last_update_unix_seconds: float
    requests: int
    sampled: int
    dropped: int
    rows: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    top: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    scored_rows: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., method: _Optional[str] = ..., threshold: _Optional[float] = ..., window: _Optional[int] = ..., window_fill: _Optional[int] = ..., min_rows: _Optional[int] = ..., sample_fraction: _Optional[float] = ..., alert: _Optional[bool] = ..., last_update_unix_seconds: _Optional[float] = ..., requests: _Optional[int] = ..., sampled: _Optional[int] = ..., dropped: _Optional[int] = ..., rows: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., top: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., scored_rows: _Optional[int] = ...) -> None: ...

class DriftStatusResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelDrift]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelDrift, _Mapping]]] = ...) -> None: ...
