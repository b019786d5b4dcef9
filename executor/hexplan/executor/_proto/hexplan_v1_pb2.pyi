from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("node", "address", "answering", "kv_bytes", "sequences")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ANSWERING_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    answering: bool
    kv_bytes: int
    sequences: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., answering: _Optional[bool] = ..., kv_bytes: _Optional[int] = ..., sequences: _Optional[int] = ...) -> None: ...

class PipelineStatus(_message.Message):
    __slots__ = ("index", "state", "in_flight", "stages", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: str
    in_flight: int
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    reason: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[str] = ..., in_flight: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "serving", "draining", "in_flight", "queued", "pipelines", "down_nodes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    DOWN_NODES_FIELD_NUMBER: _ClassVar[int]
    model: str
    serving: bool
    draining: bool
    in_flight: int
    queued: int
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineStatus]
    down_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., serving: _Optional[bool] = ..., draining: _Optional[bool] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., pipelines: _Optional[_Iterable[_Union[PipelineStatus, _Mapping]]] = ..., down_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "stop_token_ids", "max_new_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "token_ids", "sampling", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "request_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    request_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "request_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    request_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("prompt", "token_ids", "request_id", "hidden")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    hidden: bool
    def __init__(self, prompt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ..., hidden: _Optional[bool] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("logits", "hidden", "prompt_tokens", "request_id")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    hidden: Tensor
    prompt_tokens: int
    request_id: str
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SeqChunk(_message.Message):
    __slots__ = ("request_id", "start", "length", "hidden", "drop")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start: int
    length: int
    hidden: bool
    drop: bool
    def __init__(self, request_id: _Optional[str] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., hidden: _Optional[bool] = ..., drop: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("chunks", "inputs", "downstream", "micro_batches", "matmul_pieces", "greedy")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MATMUL_PIECES_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[SeqChunk]
    inputs: Tensor
    downstream: _containers.RepeatedScalarFieldContainer[str]
    micro_batches: int
    matmul_pieces: int
    greedy: bool
    def __init__(self, chunks: _Optional[_Iterable[_Union[SeqChunk, _Mapping]]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., downstream: _Optional[_Iterable[str]] = ..., micro_batches: _Optional[int] = ..., matmul_pieces: _Optional[int] = ..., greedy: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("logits", "hidden", "tokens")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    hidden: Tensor
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_ids", "downstream", "offload")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    downstream: _containers.RepeatedScalarFieldContainer[str]
    offload: bool
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., downstream: _Optional[_Iterable[str]] = ..., offload: _Optional[bool] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("stage_id", "checkpoint", "layer_start", "layer_end", "is_first", "is_last", "tp", "gpus", "dtype", "model_json", "downstream", "max_step_tokens", "calibrate_batches", "calibrate_context", "shift_sp", "shift_threshold")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SHIFT_SP_FIELD_NUMBER: _ClassVar[int]
    SHIFT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    checkpoint: str
    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool
    tp: int
    gpus: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    model_json: str
    downstream: _containers.RepeatedScalarFieldContainer[str]
    max_step_tokens: int
    calibrate_batches: _containers.RepeatedScalarFieldContainer[int]
    calibrate_context: int
    shift_sp: int
    shift_threshold: int
    def __init__(self, stage_id: _Optional[str] = ..., checkpoint: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., tp: _Optional[int] = ..., gpus: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., model_json: _Optional[str] = ..., downstream: _Optional[_Iterable[str]] = ..., max_step_tokens: _Optional[int] = ..., calibrate_batches: _Optional[_Iterable[int]] = ..., calibrate_context: _Optional[int] = ..., shift_sp: _Optional[int] = ..., shift_threshold: _Optional[int] = ...) -> None: ...

class LoadShardResponse(_message.Message):
    __slots__ = ("address", "decode")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    address: str
    decode: _containers.RepeatedCompositeFieldContainer[DecodeTiming]
    def __init__(self, address: _Optional[str] = ..., decode: _Optional[_Iterable[_Union[DecodeTiming, _Mapping]]] = ...) -> None: ...

class DecodeTiming(_message.Message):
    __slots__ = ("batch", "ms")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    ms: float
    def __init__(self, batch: _Optional[int] = ..., ms: _Optional[float] = ...) -> None: ...

class UnloadShardRequest(_message.Message):
    __slots__ = ("stage_id",)
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    def __init__(self, stage_id: _Optional[str] = ...) -> None: ...

class UnloadShardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("name", "kv_bytes", "sequences", "stages", "offloaded_bytes", "interleaved_steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    INTERLEAVED_STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kv_bytes: int
    sequences: int
    stages: _containers.RepeatedScalarFieldContainer[str]
    offloaded_bytes: int
    interleaved_steps: int
    def __init__(self, name: _Optional[str] = ..., kv_bytes: _Optional[int] = ..., sequences: _Optional[int] = ..., stages: _Optional[_Iterable[str]] = ..., offloaded_bytes: _Optional[int] = ..., interleaved_steps: _Optional[int] = ...) -> None: ...
