from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_yaml", "base_dir", "resume_from")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    base_dir: str
    resume_from: str
    def __init__(self, spec_yaml: _Optional[str] = ..., base_dir: _Optional[str] = ..., resume_from: _Optional[str] = ...) -> None: ...

class SubmitJobReply(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "node_id", "rank", "state", "step", "loss", "restarts")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    node_id: str
    rank: int
    state: str
    step: int
    loss: float
    restarts: int
    def __init__(self, worker_id: _Optional[str] = ..., node_id: _Optional[str] = ..., rank: _Optional[int] = ..., state: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., restarts: _Optional[int] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "name", "state", "mode", "generation", "workers", "step", "total_steps", "loss", "first_loss", "checkpoint", "message", "submitted_at", "updated_at", "ps", "restored_from", "restored_step", "updates_lost", "owner", "samples_per_s", "steps_per_s", "restarts", "min_workers", "max_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOSS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    RESTORED_STEP_FIELD_NUMBER: _ClassVar[int]
    UPDATES_LOST_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: str
    mode: str
    generation: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    step: int
    total_steps: int
    loss: float
    first_loss: float
    checkpoint: str
    message: str
    submitted_at: float
    updated_at: float
    ps: _containers.RepeatedCompositeFieldContainer[PSHolding]
    restored_from: str
    restored_step: int
    updates_lost: int
    owner: str
    samples_per_s: float
    steps_per_s: float
    restarts: int
    min_workers: int
    max_workers: int
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., mode: _Optional[str] = ..., generation: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., first_loss: _Optional[float] = ..., checkpoint: _Optional[str] = ..., message: _Optional[str] = ..., submitted_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., ps: _Optional[_Iterable[_Union[PSHolding, _Mapping]]] = ..., restored_from: _Optional[str] = ..., restored_step: _Optional[int] = ..., updates_lost: _Optional[int] = ..., owner: _Optional[str] = ..., samples_per_s: _Optional[float] = ..., steps_per_s: _Optional[float] = ..., restarts: _Optional[int] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...

class PSHolding(_message.Message):
    __slots__ = ("ps_id", "bytes", "backup_bytes")
    PS_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKUP_BYTES_FIELD_NUMBER: _ClassVar[int]
    ps_id: str
    bytes: int
    backup_bytes: int
    def __init__(self, ps_id: _Optional[str] = ..., bytes: _Optional[int] = ..., backup_bytes: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "name", "mode", "owner")
    STATES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[str]
    name: str
    mode: str
    owner: str
    def __init__(self, states: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., mode: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ScaleJobRequest(_message.Message):
    __slots__ = ("job_id", "min_workers", "max_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    min_workers: int
    max_workers: int
    def __init__(self, job_id: _Optional[str] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CheckpointJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class SwitchModeRequest(_message.Message):
    __slots__ = ("job_id", "mode")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    mode: str
    def __init__(self, job_id: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("job_id", "generation", "worker_id", "rank", "step", "loss", "finished")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    worker_id: str
    rank: int
    step: int
    loss: float
    finished: bool
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., worker_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., finished: _Optional[bool] = ...) -> None: ...

class ProgressAck(_message.Message):
    __slots__ = ("stop", "checkpoint")
    STOP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    checkpoint: bool
    def __init__(self, stop: _Optional[bool] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class ShardWritten(_message.Message):
    __slots__ = ("job_id", "worker_id", "generation", "rank", "world_size", "step", "position", "url", "name", "path", "sha256", "size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    generation: int
    rank: int
    world_size: int
    step: int
    position: int
    url: str
    name: str
    path: str
    sha256: str
    size: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., generation: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., position: _Optional[int] = ..., url: _Optional[str] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ShardWrittenAck(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    def __init__(self, committed: _Optional[bool] = ...) -> None: ...

class RendezvousAddress(_message.Message):
    __slots__ = ("job_id", "generation", "worker_id", "address")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    worker_id: str
    address: str
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RendezvousQuery(_message.Message):
    __slots__ = ("job_id", "generation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class RendezvousAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerLostReport(_message.Message):
    __slots__ = ("job_id", "generation", "worker_id", "suspects")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SUSPECTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    worker_id: str
    suspects: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., worker_id: _Optional[str] = ..., suspects: _Optional[_Iterable[str]] = ...) -> None: ...

class PeerLostReply(_message.Message):
    __slots__ = ("confirmed", "healthy")
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    confirmed: _containers.RepeatedScalarFieldContainer[str]
    healthy: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, confirmed: _Optional[_Iterable[str]] = ..., healthy: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class DataLeaseRequest(_message.Message):
    __slots__ = ("job_id", "generation", "worker_id", "holder", "finished", "start_hint")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    START_HINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    worker_id: str
    holder: str
    finished: _containers.RepeatedCompositeFieldContainer[BatchRange]
    start_hint: int
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., worker_id: _Optional[str] = ..., holder: _Optional[str] = ..., finished: _Optional[_Iterable[_Union[BatchRange, _Mapping]]] = ..., start_hint: _Optional[int] = ...) -> None: ...

class DataLease(_message.Message):
    __slots__ = ("range", "wait", "retry_after_ms", "epoch")
    RANGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    range: BatchRange
    wait: bool
    retry_after_ms: int
    epoch: int
    def __init__(self, range: _Optional[_Union[BatchRange, _Mapping]] = ..., wait: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...
