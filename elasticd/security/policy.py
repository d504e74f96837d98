"""Which identities may call each RPC, and for which job: the one table the gate applies.

``docs/security.md`` prints this table for people; a test checks that every RPC
of every service is in both, and that they agree.

Callers, as they appear in :data:`RULES`:

- ``controller``, ``ps``, ``agent``: a daemon of that kind (a certificate
  naming the kind; a node certificate or the cluster token may act as any kind).
- ``worker``: a training process, with its job credential, for its own job
  only, for its generation or an older one, and in its own worker's name where
  the request names a worker.
- ``rank0``: as ``worker``, and the credential holds rank 0 of the request's
  generation.
- ``user:read``, ``user:submit``: a user with at least that role.
- ``user:own``: a user with role submit who owns the job, or an admin.

Health checking and reflection are open to everybody, under their own
thread limit (:mod:`elasticd.serving`). Anything not in the table is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
USER_SERVICE = "elasticd.job.JobService"
COORDINATOR = "elasticd.job.TrainingCoordinator"
PS = "elasticd.ps.ParameterServer"
AGENT = "elasticd.NodeAgent"

RULES: dict[str, tuple[str, ...]] = {
    # Users. Admin may do anything a lesser role may.
    f"{USER_SERVICE}/SubmitJob": ("user:submit",),
    f"{USER_SERVICE}/GetJob": ("user:read",),
    f"{USER_SERVICE}/ListJobs": ("user:read",),
    f"{USER_SERVICE}/WatchJob": ("user:read",),
    f"{USER_SERVICE}/CancelJob": ("user:own",),
    f"{USER_SERVICE}/CheckpointJob": ("user:own",),
    f"{USER_SERVICE}/SwitchMode": ("user:own",),
    f"{USER_SERVICE}/ScaleJob": ("user:own",),
    # Training processes talk to the controller about their own job.
    f"{COORDINATOR}/ReportProgress": ("worker",),
    f"{COORDINATOR}/ReportShard": ("worker",),
    f"{COORDINATOR}/ReportPeerLost": ("worker",),
    f"{COORDINATOR}/LeaseData": ("worker",),
    f"{COORDINATOR}/LookupRendezvous": ("worker",),
    f"{COORDINATOR}/PublishRendezvous": ("rank0",),
    # The data path: a job's own workers (and the controller, which may move any state).
    f"{PS}/Pull": ("worker", "controller"),
    f"{PS}/PullOnce": ("worker", "controller"),
    f"{PS}/Push": ("worker", "controller"),
    f"{PS}/PushOnce": ("worker", "controller"),
    # A job's first worker seeds its groups (user code never runs in the controller);
    # the PS keeps the first copy, so a worker can only seed its own job's groups.
    f"{PS}/InitShard": ("controller", "worker"),
    f"{PS}/ShardInfo": ("controller", "ps", "worker"),
    # Moving state is the controller's alone.
    f"{PS}/Snapshot": ("controller",),
    f"{PS}/AdvanceGeneration": ("controller",),
    f"{PS}/DropShard": ("controller",),
    f"{PS}/Stats": ("controller", "ps"),
    f"{PS}/ExportShard": ("controller",),
    f"{PS}/ImportShard": ("controller",),
    f"{PS}/RestoreShard": ("controller",),
    f"{PS}/ConfigureShard": ("controller",),
    # Hot replicas: a primary PS feeds its backup.
    f"{PS}/Replicate": ("ps",),
    f"{PS}/OpenReplica": ("ps",),
    # Agents: the controller asks whether a suspect lives; chaos needs --allow-chaos too.
    f"{AGENT}/WorkerState": ("controller",),
    f"{AGENT}/InjectFault": ("controller",),
}

JOB_CALLERS = ("worker", "rank0")


@dataclass(frozen=True)
class Scope:
    """What a request is about, as far as the policy cares."""

    job_id: str | None = None  # None: the request names no job
    generation: int | None = None
    worker_id: str | None = None  # the worker the request speaks for, if it names one


def scope_of(message) -> Scope:
    """The job, generation and worker a request (or a stream's first message) names.

    Requests name them in one of a few shapes: top-level fields, a ``fence``, or a
    ``header`` holding either.
    """
    if message is None:
        return Scope()
    for holder_name in ("header", ""):
        holder = message
        if holder_name:
            if not _has(message, holder_name):
                continue
            holder = getattr(message, holder_name)
        fence = getattr(holder, "fence", None) if _has(holder, "fence") else None
        source = fence if fence is not None else holder
        job = getattr(source, "job_id", None)
        if job is None:
            continue
        generation = getattr(source, "generation", None)
        worker = getattr(holder, "worker_id", None) or getattr(message, "worker_id", None)
        return Scope(job, generation if isinstance(generation, int) else None, worker or None)
    return Scope()


def _has(message, field: str) -> bool:
    try:
        return message.HasField(field)
    except (ValueError, AttributeError):
        return False


def callers(method: str) -> tuple[str, ...]:
    """Who may call ``/service/method`` (or ``service/method``); () for nobody."""
    return RULES.get(method.lstrip("/"), ())


def describe(method: str) -> str:
    who = callers(method)
    return " or ".join(who) if who else "nobody"
