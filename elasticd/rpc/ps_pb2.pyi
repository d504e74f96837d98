from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fence(_message.Message):
    __slots__ = ("job_id", "generation", "shard")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    shard: str
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("key", "dtype", "shape")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "kwargs_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs_json: str
    def __init__(self, name: _Optional[str] = ..., kwargs_json: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "offset", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class InitShardHeader(_message.Message):
    __slots__ = ("fence", "tensors", "optimizer", "max_staleness", "workers", "max_version", "incarnation", "backup", "backup_address")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    optimizer: OptimizerConfig
    max_staleness: int
    workers: int
    max_version: int
    incarnation: str
    backup: bool
    backup_address: str
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., max_staleness: _Optional[int] = ..., workers: _Optional[int] = ..., max_version: _Optional[int] = ..., incarnation: _Optional[str] = ..., backup: _Optional[bool] = ..., backup_address: _Optional[str] = ...) -> None: ...

class InitShardRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: InitShardHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[InitShardHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class InitShardReply(_message.Message):
    __slots__ = ("created", "version", "digest")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    created: bool
    version: int
    digest: str
    def __init__(self, created: _Optional[bool] = ..., version: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("fence", "worker_id")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    worker_id: str
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., worker_id: _Optional[str] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "tensors")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("fence", "worker_id", "base_version", "compression", "payload", "workers", "push_id", "batch")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    worker_id: str
    base_version: int
    compression: str
    payload: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    workers: int
    push_id: int
    batch: int
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., worker_id: _Optional[str] = ..., base_version: _Optional[int] = ..., compression: _Optional[str] = ..., payload: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., workers: _Optional[int] = ..., push_id: _Optional[int] = ..., batch: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushWhole(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class PullWhole(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("version", "applied", "staleness", "duplicate")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    version: int
    applied: bool
    staleness: int
    duplicate: bool
    def __init__(self, version: _Optional[int] = ..., applied: _Optional[bool] = ..., staleness: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("fence", "url", "name", "step")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    url: str
    name: str
    step: int
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., url: _Optional[str] = ..., name: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class SnapshotReply(_message.Message):
    __slots__ = ("path", "sha256", "size", "version", "applied")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size: int
    version: int
    applied: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., version: _Optional[int] = ..., applied: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardInfoRequest(_message.Message):
    __slots__ = ("job_id", "shard")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard: str
    def __init__(self, job_id: _Optional[str] = ..., shard: _Optional[str] = ...) -> None: ...

class ShardInfoReply(_message.Message):
    __slots__ = ("exists", "incarnation", "generation", "version", "bytes", "tensors", "backup", "backup_address", "shard", "applied")
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    incarnation: str
    generation: int
    version: int
    bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    backup: bool
    backup_address: str
    shard: str
    applied: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, exists: _Optional[bool] = ..., incarnation: _Optional[str] = ..., generation: _Optional[int] = ..., version: _Optional[int] = ..., bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., backup: _Optional[bool] = ..., backup_address: _Optional[str] = ..., shard: _Optional[str] = ..., applied: _Optional[_Iterable[int]] = ...) -> None: ...

class AdvanceGenerationRequest(_message.Message):
    __slots__ = ("fence", "workers")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    workers: int
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., workers: _Optional[int] = ...) -> None: ...

class DropShardRequest(_message.Message):
    __slots__ = ("fence",)
    FENCE_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class DropShardReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum", "count")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    count: int
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class JobStats(_message.Message):
    __slots__ = ("job_id", "generation", "version", "bytes", "bytes_in", "bytes_out", "pulls", "pushes_applied", "pushes_rejected", "staleness", "optimizer_step_seconds", "shard", "backup", "snapshot_pause_seconds")
    class PushesRejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    version: int
    bytes: int
    bytes_in: int
    bytes_out: int
    pulls: int
    pushes_applied: int
    pushes_rejected: _containers.ScalarMap[str, int]
    staleness: Histogram
    optimizer_step_seconds: Histogram
    shard: str
    backup: bool
    snapshot_pause_seconds: Histogram
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., version: _Optional[int] = ..., bytes: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., pulls: _Optional[int] = ..., pushes_applied: _Optional[int] = ..., pushes_rejected: _Optional[_Mapping[str, int]] = ..., staleness: _Optional[_Union[Histogram, _Mapping]] = ..., optimizer_step_seconds: _Optional[_Union[Histogram, _Mapping]] = ..., shard: _Optional[str] = ..., backup: _Optional[bool] = ..., snapshot_pause_seconds: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("ps_id", "jobs", "unknown_job_requests")
    PS_ID_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_JOB_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ps_id: str
    jobs: _containers.RepeatedCompositeFieldContainer[JobStats]
    unknown_job_requests: int
    def __init__(self, ps_id: _Optional[str] = ..., jobs: _Optional[_Iterable[_Union[JobStats, _Mapping]]] = ..., unknown_job_requests: _Optional[int] = ...) -> None: ...

class ShardBytes(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ExportShardRequest(_message.Message):
    __slots__ = ("fence",)
    FENCE_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class ReplicateHeader(_message.Message):
    __slots__ = ("fence", "version", "workers", "push_ids", "batches")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PUSH_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    version: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    push_ids: _containers.RepeatedScalarFieldContainer[int]
    batches: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., version: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ..., push_ids: _Optional[_Iterable[int]] = ..., batches: _Optional[_Iterable[int]] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ReplicateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ReplicateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ReplicateReply(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class OpenReplicaRequest(_message.Message):
    __slots__ = ("fence",)
    FENCE_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class OpenReplicaReply(_message.Message):
    __slots__ = ("port", "token")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class ConfigureShardRequest(_message.Message):
    __slots__ = ("fence", "backup", "backup_address")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    fence: Fence
    backup: bool
    backup_address: str
    def __init__(self, fence: _Optional[_Union[Fence, _Mapping]] = ..., backup: _Optional[bool] = ..., backup_address: _Optional[str] = ...) -> None: ...

class ImportShardHeader(_message.Message):
    __slots__ = ("shard", "version")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    shard: InitShardHeader
    version: int
    def __init__(self, shard: _Optional[_Union[InitShardHeader, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ImportShardRequest(_message.Message):
    __slots__ = ("header", "bytes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    header: ImportShardHeader
    bytes: ShardBytes
    def __init__(self, header: _Optional[_Union[ImportShardHeader, _Mapping]] = ..., bytes: _Optional[_Union[ShardBytes, _Mapping]] = ...) -> None: ...

class RestoreShardRequest(_message.Message):
    __slots__ = ("header", "url", "job_id", "step", "name", "path", "sha256", "size")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    header: ImportShardHeader
    url: str
    job_id: str
    step: int
    name: str
    path: str
    sha256: str
    size: int
    def __init__(self, header: _Optional[_Union[ImportShardHeader, _Mapping]] = ..., url: _Optional[str] = ..., job_id: _Optional[str] = ..., step: _Optional[int] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...
