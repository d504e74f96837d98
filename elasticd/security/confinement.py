"""What user code gets from the daemon that starts it: an environment, a user.

Training processes (started by an agent) and the task probe (started by the
controller) run users' code, so they get nothing of their daemon's
(ARCHITECTURE invariant 11):

* **An allow-listed environment** (:func:`training_environment`): locale,
  time zone, thread and device variables, NCCL/gloo tuning, ``PATH``, the
  run-as user's ``HOME``, what the operator names (``--worker-env``), and of
  the security settings only what a client of the cluster needs to reach it:
  the CA, the server name and, under mutual TLS, the cluster's *job*
  certificate (which grants nothing by itself). Never the cluster token, an
  etcd credential, the tokens file, the config file or the node's key: a
  daemon exports those into its own environment
  (:func:`~elasticd.security.config.export_to_environment`), which is why
  this is an allow list and not a deny list.
* **An unprivileged user** (:class:`RunAs`; ``elasticd agent --run-as``,
  ``elasticd controller --probe-run-as``), with its own group and no
  supplementary groups (:func:`elasticd.spawn.spawn` drops to it).
"""

from __future__ import annotations

import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from elasticd.security.config import Security

# Passed through from the daemon's environment as they are.
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


class ConfinementError(ValueError):
    """A confinement cannot be set up as asked (an unknown user, a forbidden variable)."""


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
            raise ConfinementError(f"--run-as {name!r}: no such user") from None
        if entry.pw_uid == 0:
            raise ConfinementError(f"--run-as {name!r}: that is root; name an unprivileged user")
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
        raise ConfinementError(f"--worker-env {', '.join(bad)}: never given to a training process")
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
