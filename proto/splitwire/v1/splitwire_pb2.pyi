from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
    FINISH_REASON_MAX_NEW_TOKENS: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason
FINISH_REASON_MAX_NEW_TOKENS: FinishReason

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model", "split", "codec", "payload", "generation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    split: int
    codec: str
    payload: bytes
    generation: GenerationOptions
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., split: _Optional[int] = ..., codec: _Optional[str] = ..., payload: _Optional[bytes] = ..., generation: _Optional[_Union[GenerationOptions, _Mapping]] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "max_new_tokens", "stop_token_ids")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class NextToken(_message.Message):
    __slots__ = ("id", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    logprob: float
    def __init__(self, id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "compute_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "embedding", "next_token", "payload_bytes", "tokens", "timing", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    embedding: Embedding
    next_token: NextToken
    payload_bytes: int
    tokens: int
    timing: ServerTiming
    finish_reason: FinishReason
    def __init__(self, request_id: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., next_token: _Optional[_Union[NextToken, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CodecInfo(_message.Message):
    __slots__ = ("name", "kind", "fingerprint", "splits", "expected_bits_per_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BITS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    fingerprint: str
    splits: _containers.RepeatedScalarFieldContainer[int]
    expected_bits_per_token: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., fingerprint: _Optional[str] = ..., splits: _Optional[_Iterable[int]] = ..., expected_bits_per_token: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "fingerprint", "num_blocks", "hidden_size", "default_split", "splits", "codecs", "default_codec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SPLIT_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CODEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    fingerprint: str
    num_blocks: int
    hidden_size: int
    default_split: int
    splits: _containers.RepeatedScalarFieldContainer[int]
    codecs: _containers.RepeatedCompositeFieldContainer[CodecInfo]
    default_codec: str
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., fingerprint: _Optional[str] = ..., num_blocks: _Optional[int] = ..., hidden_size: _Optional[int] = ..., default_split: _Optional[int] = ..., splits: _Optional[_Iterable[int]] = ..., codecs: _Optional[_Iterable[_Union[CodecInfo, _Mapping]]] = ..., default_codec: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "models", "default_model", "max_message_bytes", "max_tokens")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    max_message_bytes: int
    max_tokens: int
    def __init__(self, version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...
