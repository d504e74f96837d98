"""What the controller keeps in etcd about each job, as plain records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

PENDING = "PENDING"
WAITING = "WAITING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass(frozen=True)
class JobRecord:
    """A job's status: written on events (admission, seal, checkpoint, end), never per step."""

    job_id: str
    name: str
    mode: str  # the mode the job trains in now (a switch changes it)
    state: str = PENDING
    generation: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = float("nan")
    first_loss: float = float("nan")
    checkpoint: str = ""
    checkpoint_step: int = 0
    checkpoint_at: float = 0.0  # when the newest checkpoint was committed (Unix time)
    message: str = ""
    switches_done: int = 0  # how many of the spec's scheduled switches have happened
    # The last restore from a checkpoint: its manifest URL, the generation that
    # began from it, its step, and how many applied updates it lost.
    resume_from: str = ""  # the checkpoint the user asked the job to start from
    # A restore under way: the generation it imports into, written before the first
    # import. Until a generation that began from it is sealed (restored_generation
    # reaches it), every seal of the job is a restore.
    restore_pending: int = 0
    restored_from: str = ""
    restored_generation: int = 0
    restored_step: int = 0
    updates_lost: int = 0
    submitted_at: float = 0.0
    updated_at: float = 0.0
    owner: str = ""  # the identity that submitted the job (empty without authentication)
    # Written when the job ends, from its agents' last reports (they withdraw them then):
    # each worker's final state, and the most restarts any worker had.
    final_workers: dict[str, str] = field(default_factory=dict)
    restarts: int = 0

    def evolve(self, **changes) -> JobRecord:
        return replace(self, **changes)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
