from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("party", "role", "terms_json", "wait_s")
    PARTY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERMS_JSON_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    party: str
    role: str
    terms_json: str
    wait_s: float
    def __init__(self, party: _Optional[str] = ..., role: _Optional[str] = ..., terms_json: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("ready", "job_id", "terms_json")
    READY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TERMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    job_id: str
    terms_json: str
    def __init__(self, ready: _Optional[bool] = ..., job_id: _Optional[str] = ..., terms_json: _Optional[str] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ("party", "samples", "max_steps", "adapter_schema_json", "public_key", "public_key_signature", "wait_s", "certificate", "nonce", "terms_digest")
    PARTY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TERMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    party: str
    samples: int
    max_steps: int
    adapter_schema_json: str
    public_key: bytes
    public_key_signature: bytes
    wait_s: float
    certificate: bytes
    nonce: bytes
    terms_digest: str
    def __init__(self, party: _Optional[str] = ..., samples: _Optional[int] = ..., max_steps: _Optional[int] = ..., adapter_schema_json: _Optional[str] = ..., public_key: _Optional[bytes] = ..., public_key_signature: _Optional[bytes] = ..., wait_s: _Optional[float] = ..., certificate: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., terms_digest: _Optional[str] = ...) -> None: ...

class StartInfo(_message.Message):
    __slots__ = ("ready", "rounds", "weights", "public_keys", "public_key_signatures", "certificates", "nonces", "terms_digests")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PublicKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class PublicKeySignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class CertificatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class NoncesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class TermsDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    READY_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    NONCES_FIELD_NUMBER: _ClassVar[int]
    TERMS_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    rounds: int
    weights: _containers.ScalarMap[str, float]
    public_keys: _containers.ScalarMap[str, bytes]
    public_key_signatures: _containers.ScalarMap[str, bytes]
    certificates: _containers.ScalarMap[str, bytes]
    nonces: _containers.ScalarMap[str, bytes]
    terms_digests: _containers.ScalarMap[str, str]
    def __init__(self, ready: _Optional[bool] = ..., rounds: _Optional[int] = ..., weights: _Optional[_Mapping[str, float]] = ..., public_keys: _Optional[_Mapping[str, bytes]] = ..., public_key_signatures: _Optional[_Mapping[str, bytes]] = ..., certificates: _Optional[_Mapping[str, bytes]] = ..., nonces: _Optional[_Mapping[str, bytes]] = ..., terms_digests: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("party", "state", "round", "step", "max_steps", "has_loss", "loss", "error", "round_wait_s", "has_eval_loss", "eval_loss", "eval_samples")
    PARTY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROUND_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    HAS_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    party: str
    state: str
    round: int
    step: int
    max_steps: int
    has_loss: bool
    loss: float
    error: str
    round_wait_s: float
    has_eval_loss: bool
    eval_loss: float
    eval_samples: int
    def __init__(self, party: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., max_steps: _Optional[int] = ..., has_loss: _Optional[bool] = ..., loss: _Optional[float] = ..., error: _Optional[str] = ..., round_wait_s: _Optional[float] = ..., has_eval_loss: _Optional[bool] = ..., eval_loss: _Optional[float] = ..., eval_samples: _Optional[int] = ...) -> None: ...

class JobPhase(_message.Message):
    __slots__ = ("phase", "error")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    phase: str
    error: str
    def __init__(self, phase: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusJson(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("party", "round", "wait_s")
    PARTY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    party: str
    round: int
    wait_s: float
    def __init__(self, party: _Optional[str] = ..., round: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BlobHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlobHeader(_message.Message):
    __slots__ = ("party", "round", "size", "ready", "phase", "error", "unmask")
    PARTY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    party: str
    round: int
    size: int
    ready: bool
    phase: str
    error: str
    unmask: UnmaskRequest
    def __init__(self, party: _Optional[str] = ..., round: _Optional[int] = ..., size: _Optional[int] = ..., ready: _Optional[bool] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ..., unmask: _Optional[_Union[UnmaskRequest, _Mapping]] = ...) -> None: ...

class EncryptedShares(_message.Message):
    __slots__ = ("party", "shares")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PARTY_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    party: str
    shares: _containers.ScalarMap[str, bytes]
    def __init__(self, party: _Optional[str] = ..., shares: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("round", "uploaded", "dropped", "ciphertexts", "signatures")
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class SignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    round: int
    uploaded: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    ciphertexts: _containers.ScalarMap[str, bytes]
    signatures: _containers.ScalarMap[str, bytes]
    def __init__(self, round: _Optional[int] = ..., uploaded: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., ciphertexts: _Optional[_Mapping[str, bytes]] = ..., signatures: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class RevealedShares(_message.Message):
    __slots__ = ("party", "round", "shares", "signature")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PARTY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    party: str
    round: int
    shares: _containers.ScalarMap[str, bytes]
    signature: bytes
    def __init__(self, party: _Optional[str] = ..., round: _Optional[int] = ..., shares: _Optional[_Mapping[str, bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...
