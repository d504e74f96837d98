"""What a training process gets on its node: environment, user, working directory.

A training process runs a user's code, so it gets nothing of its agent's
(ARCHITECTURE invariant 11):

* **An allow-listed environment** (:func:`training_environment`): locale,
  time zone, thread and device variables, NCCL/gloo tuning, ``PATH``, the
  run-as user's ``HOME``, what the operator names with ``--worker-env``, and
  of the security settings only what a client of the cluster needs to reach
  it: the CA, the server name and, under mutual TLS, the cluster's *job*
  certificate (which grants nothing by itself). Never the cluster token, an
  etcd credential, the tokens file, the config file or the node's key: the
  agent exported those into its own environment, which is why this is an
  allow list and not a deny list.
* **An unprivileged user** (``--run-as``): an agent run as root starts its
  training processes, warm ones included, as that user, with its own group
  and no supplementary groups. Its log files are opened by the agent; what it
  writes lives in its job's directory.
* **A per-job working directory** (:meth:`Sandbox.job_dir`):
  ``<work-dir>/<job>``, mode 0700, owned by the run-as user, created by the
  agent. The training interpreter starts with ``-P`` (:mod:`.launch`), so
  that directory is never on ``sys.path``.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from elasticd.security.config import Security

log = logging.getLogger(__name__)

# Passed through from the agent's environment as they are.
ALLOWED_NAMES = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONUNBUFFERED",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "LD_LIBRARY_PATH",  # where CUDA's libraries are on many GPU hosts
        "OPENBLAS_NUM_THREADS",
        "ELASTICD_LOG_FORMAT",  # training processes log as their agent does
        "ELASTICD_LOG_LEVEL",
    }
)
ALLOWED_PREFIXES = ("LC_", "OMP_", "MKL_", "NCCL_", "GLOO_")
# Of the security settings, what a training process may know: how to check the servers
# it calls, and the job certificate to get through a mutual-TLS handshake.
TLS_CA_ENV = "ELASTICD_TLS_CA"
TLS_SERVER_NAME_ENV = "ELASTICD_TLS_SERVER_NAME"
TLS_CERT_ENV = "ELASTICD_TLS_CERT"
TLS_KEY_ENV = "ELASTICD_TLS_KEY"
# Never given to a training process, whatever --worker-env says.
FORBIDDEN_NAMES = frozenset(
    {
        "ELASTICD_CONFIG",
        "ELASTICD_CLUSTER_TOKEN",
        "ELASTICD_CLUSTER_TOKEN_FILE",
        "ELASTICD_TOKEN",
        "ELASTICD_TOKEN_FILE",
        "ELASTICD_TOKENS_FILE",
        "ELASTICD_JOB_SECRET",
        "ELASTICD_JOB_SECRET_FILE",
        "ELASTICD_JOB_CERT",
        "ELASTICD_JOB_KEY",
        "ELASTICD_TLS_CERT",  # set from job_cert/job_key below, never the node's
        "ELASTICD_TLS_KEY",
        "ELASTICD_TLS_CLIENT_AUTH",
        "ELASTICD_INSECURE",
        "ELASTICD_ALLOWED_STORAGE",
    }
)
FORBIDDEN_PREFIXES = ("ELASTICD_ETCD_",)
WORK_DIR_MODE = 0o711  # the run-as user reaches its job's directory, lists none


class SandboxError(ValueError):
    """The sandbox cannot be set up as asked (an unknown user, a forbidden variable)."""


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user training processes run as."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> RunAs:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SandboxError(f"--run-as {name!r}: no such user") from None
        if entry.pw_uid == 0:
            raise SandboxError(f"--run-as {name!r}: that is root; name an unprivileged user")
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def forbidden(name: str) -> bool:
    return name in FORBIDDEN_NAMES or name.startswith(FORBIDDEN_PREFIXES)


def allowed(name: str, extra: Iterable[str] = ()) -> bool:
    if forbidden(name):
        return False
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES) or name in set(extra)


def training_environment(
    environ: Mapping[str, str],
    security: Security,
    extra: Iterable[str] = (),
    run_as: RunAs | None = None,
) -> dict[str, str]:
    """The environment every training process of this agent starts from.

    ``environ`` is the agent's; ``extra`` the names the operator allows on top of
    :data:`ALLOWED_NAMES` (``--worker-env``)."""
    extra = tuple(extra)
    bad = [name for name in extra if forbidden(name)]
    if bad:
        raise SandboxError(f"--worker-env {', '.join(bad)}: never given to a training process")
    env = {k: v for k, v in environ.items() if allowed(k, extra)}
    if run_as is not None:
        env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
    else:
        env.update({k: environ[k] for k in ("HOME", "USER", "LOGNAME") if k in environ})
    if security.tls_ca:
        env[TLS_CA_ENV] = security.tls_ca
    if security.tls_server_name:
        env[TLS_SERVER_NAME_ENV] = security.tls_server_name
    if security.tls_client_auth and security.job_cert:
        env[TLS_CERT_ENV], env[TLS_KEY_ENV] = security.job_cert, security.job_key
    return env


@dataclass(frozen=True)
class Sandbox:
    """How this agent starts training processes: environment, user, working directory."""

    environment: dict[str, str]
    work_dir: Path
    run_as: RunAs | None = None
    _made: set[str] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def unconfined(cls, work_dir: str | Path) -> Sandbox:
        """As this process's user, with the allow-listed part of its environment."""
        from elasticd.security.config import current

        return cls(training_environment(os.environ, current()), Path(work_dir))

    def job_dir(self, job_id: str) -> str:
        """``<work-dir>/<job>``: created (mode 0700, the run-as user's) on first use."""
        if not job_id or job_id in (".", "..") or "/" in job_id:
            raise SandboxError(f"job id {job_id!r} cannot name a directory")
        path = self.work_dir / job_id
        if job_id in self._made:
            return str(path)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.chmod(WORK_DIR_MODE)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise SandboxError(f"{path} exists and is not a directory") from None
        if self.run_as is not None:
            os.chown(path, self.run_as.uid, self.run_as.gid, follow_symlinks=False)
        path.chmod(0o700)
        self._made.add(job_id)
        return str(path)

    def check_reachable(self) -> None:
        """Raise SandboxError unless the run-as user can reach the work directory."""
        if self.run_as is None:
            return
        for parent in reversed(self.work_dir.parents):
            if not parent.exists():
                break  # created by the agent, traversable
            st = parent.stat()
            if st.st_uid == self.run_as.uid:
                ok = st.st_mode & 0o100
            elif st.st_gid == self.run_as.gid:
                ok = st.st_mode & 0o010
            else:
                ok = st.st_mode & 0o001
            if not ok:
                raise SandboxError(
                    f"--work-dir {self.work_dir}: {self.run_as.name} cannot enter {parent} "
                    "(give the work directory a path that user may traverse)"
                )
