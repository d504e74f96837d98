from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerStateRequest(_message.Message):
    __slots__ = ("job_id", "worker_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class WorkerStateReply(_message.Message):
    __slots__ = ("state", "pid", "generation")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    state: str
    pid: int
    generation: int
    def __init__(self, state: _Optional[str] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class InjectFaultRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "signal", "resume_after_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    signal: str
    resume_after_s: float
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., signal: _Optional[str] = ..., resume_after_s: _Optional[float] = ...) -> None: ...

class InjectFaultReply(_message.Message):
    __slots__ = ("pid", "target")
    PID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    pid: int
    target: str
    def __init__(self, pid: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...
