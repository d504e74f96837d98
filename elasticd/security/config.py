"""Who a process is and whom it lets in: TLS paths, tokens, etcd credentials.

Every daemon and client reads the same settings, from (later wins):

1. a YAML file shared by all daemons (``--config PATH`` or ``ELASTICD_CONFIG``),
2. environment variables (``ELASTICD_TLS_CERT`` ... below),
3. command-line flags (``--tls-cert`` ...).

A process exports what it resolved into its environment
(:func:`export_to_environment`), so the training processes an agent starts
present the same identity as the agent.

The config file's keys are the field names of :class:`Security`::

    tls_cert: /etc/elasticd/node.pem
    tls_key: /etc/elasticd/node-key.pem
    tls_ca: /etc/elasticd/ca.pem
    tls_client_auth: true         # mutual TLS: servers require a certificate signed by tls_ca
    cluster_token_file: /etc/elasticd/cluster-token
    tokens_file: /etc/elasticd/tokens.yaml    # the controller's JobService tokens
    token_file: ~/.elasticd/token             # the token this client presents
    etcd_ca: /etc/elasticd/etcd-ca.pem
    etcd_user: elasticd
    etcd_password_file: /etc/elasticd/etcd-password
    job_cert: /etc/elasticd/job.pem           # mutual TLS: what training processes present
    job_key: /etc/elasticd/job-key.pem        # (grants nothing without a job credential)
    job_secret_file: /etc/elasticd/job-secret # signs job credentials (default: the cluster token)
    allowed_storage: [file:///var/lib/elasticd, s3://bucket/elasticd]  # controller only
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_ENV = "ELASTICD_CONFIG"


class SecurityError(ValueError):
    """The security settings are incomplete or contradict each other."""


@dataclass(frozen=True)
class Security:
    tls_cert: str = ""  # PEM certificate this process presents, as server and as client
    tls_key: str = ""  # its private key
    tls_ca: str = ""  # PEM CA bundle that signs the cluster's certificates
    tls_client_auth: bool = False  # servers require a client certificate signed by tls_ca
    tls_server_name: str = ""  # name checked in servers' certificates instead of the host
    cluster_token: str = ""  # bearer token internal services accept (without mTLS)
    tokens_file: str = ""  # JobService tokens (controller): name, role, token each
    token: str = ""  # bearer token this client presents to the JobService
    etcd_ca: str = ""  # CA of etcd's server certificate: connect to etcd over TLS
    etcd_cert: str = ""  # client certificate for etcd (``--client-cert-auth``)
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password: str = field(default="", repr=False)
    insecure: bool = False  # allow plaintext on an address other than loopback
    job_cert: str = ""  # mutual TLS: the certificate training processes present (no authority)
    job_key: str = ""
    job_secret: str = field(default="", repr=False)  # signs job credentials; else cluster_token
    # URL roots that checkpoint, tensorboard and restore URLs must lie under (controller)
    allowed_storage: tuple[str, ...] = ()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)

    @property
    def etcd_tls(self) -> bool:
        return bool(self.etcd_ca or self.etcd_cert)

    def check(self) -> None:
        """Raise SecurityError naming what is missing, before any port is opened."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityError("tls_cert and tls_key: give both or neither")
        if self.tls_client_auth and not (self.tls_ca and self.tls_cert):
            raise SecurityError("tls_client_auth needs tls_ca and this process's tls_cert/tls_key")
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise SecurityError("etcd_cert and etcd_key: give both or neither")
        if bool(self.etcd_user) != bool(self.etcd_password):
            raise SecurityError("etcd_user and etcd_password: give both or neither")
        if bool(self.job_cert) != bool(self.job_key):
            raise SecurityError("job_cert and job_key: give both or neither")
        for name in ("tls_cert", "tls_key", "tls_ca", "etcd_ca", "etcd_cert", "job_cert"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SecurityError(f"{name}: no such file {path!r}")

    @property
    def members_checked(self) -> bool:
        """Internal services know who calls them: a client certificate or the cluster token."""
        return self.tls_client_auth or bool(self.cluster_token)


# field → environment variable. Secrets come from a *_FILE variable as well.
ENV = {
    "tls_cert": "ELASTICD_TLS_CERT",
    "tls_key": "ELASTICD_TLS_KEY",
    "tls_ca": "ELASTICD_TLS_CA",
    "tls_client_auth": "ELASTICD_TLS_CLIENT_AUTH",
    "tls_server_name": "ELASTICD_TLS_SERVER_NAME",
    "cluster_token": "ELASTICD_CLUSTER_TOKEN",
    "tokens_file": "ELASTICD_TOKENS_FILE",
    "token": "ELASTICD_TOKEN",
    "etcd_ca": "ELASTICD_ETCD_CA",
    "etcd_cert": "ELASTICD_ETCD_CERT",
    "etcd_key": "ELASTICD_ETCD_KEY",
    "etcd_user": "ELASTICD_ETCD_USER",
    "etcd_password": "ELASTICD_ETCD_PASSWORD",
    "insecure": "ELASTICD_INSECURE",
    "job_cert": "ELASTICD_JOB_CERT",
    "job_key": "ELASTICD_JOB_KEY",
    "job_secret": "ELASTICD_JOB_SECRET",
    "allowed_storage": "ELASTICD_ALLOWED_STORAGE",  # comma-separated in the environment
}
SECRETS = ("cluster_token", "token", "etcd_password", "job_secret")  # also read from <name>_file
LISTS = ("allowed_storage",)
BOOLEANS = ("tls_client_auth", "insecure")


def _boolean(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise SecurityError(f"{name}: expected true or false, got {value!r}")


def _string_list(name: str, value, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SecurityError(f"{source}: {name} must be a list of strings")
    return tuple(v.strip() for v in value)


def _read_secret(name: str, path: str) -> str:
    try:
        return Path(os.path.expanduser(path)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecurityError(f"{name}_file: cannot read {path!r}: {exc.strerror}") from exc


def _from_mapping(values: dict, source: str) -> dict:
    known = {f.name for f in dataclasses.fields(Security)}
    out = {}
    for key, value in values.items():
        if key.endswith("_file") and key[: -len("_file")] in SECRETS:
            if value:
                out[key[: -len("_file")]] = _read_secret(key[: -len("_file")], str(value))
            continue
        if key not in known:
            raise SecurityError(f"{source}: unknown setting {key!r}")
        if key in BOOLEANS:
            out[key] = _boolean(key, value)
        elif key in LISTS:
            out[key] = _string_list(key, value, source)
        elif value is not None:
            if not isinstance(value, (str, int, float)):
                raise SecurityError(f"{source}: {key} must be a string, got {type(value).__name__}")
            out[key] = str(value)
    return out


def _config_file(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SecurityError(f"config {path!r}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SecurityError(f"config {path!r}: not YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SecurityError(f"config {path!r}: expected a mapping of settings")
    # relative paths are relative to the file
    return _from_mapping(_anchored(data, Path(path).resolve().parent), f"config {path}")


PATHS = (
    "tls_cert",
    "tls_key",
    "tls_ca",
    "tokens_file",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "job_cert",
    "job_key",
)


def _anchored(values: dict, base: Path) -> dict:
    out = dict(values)
    for key, value in values.items():
        if (key in PATHS or key.endswith("_file")) and isinstance(value, str) and value:
            out[key] = str(base / os.path.expanduser(value))
    return out


def from_settings(values: dict, base: Path) -> Security:
    """The Security a config file in ``base`` holding ``values`` would give."""
    security = Security(**_from_mapping(_anchored(values, base), f"settings in {base}"))
    security.check()
    return security


def _from_environment(environ) -> dict:
    raw = {}
    for name, var in ENV.items():
        if environ.get(var):
            raw[name] = environ[var]
        if name in SECRETS and environ.get(var + "_FILE"):
            raw[name + "_file"] = environ[var + "_FILE"]
    return _from_mapping(raw, "environment")


def add_security_arguments(p: argparse.ArgumentParser, server: bool = True) -> None:
    g = p.add_argument_group("security (flags override ELASTICD_* variables and --config)")
    g.add_argument("--config", default=None, help=f"YAML settings file (env {CONFIG_ENV})")
    g.add_argument("--tls-cert", default=None, help="PEM certificate of this process")
    g.add_argument("--tls-key", default=None, help="its private key")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signs the cluster's certificates")
    g.add_argument(
        "--tls-client-auth",
        action="store_true",
        default=None,
        help="mutual TLS: require client certificates signed by --tls-ca",
    )
    g.add_argument(
        "--cluster-token-file", default=None, help="file holding the cluster members' token"
    )
    g.add_argument("--etcd-ca", default=None, help="CA of etcd's certificate: etcd over TLS")
    g.add_argument("--etcd-user", default=None, help="etcd user (password: --etcd-password-file)")
    g.add_argument("--etcd-password-file", default=None, help="file holding the etcd password")
    if server:
        g.add_argument(
            "--insecure",
            action="store_true",
            default=None,
            help="allow plaintext and unauthenticated ports on an address other than loopback",
        )
    else:
        g.add_argument("--token-file", default=None, help="file holding your JobService token")


def resolve(args: argparse.Namespace | None = None, environ=None) -> Security:
    """The settings of this process: config file, then environment, then flags."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    path = getattr(args, "config", None) or environ.get(CONFIG_ENV)
    if path:
        values.update(_config_file(path))
    values.update(_from_environment(environ))
    if args is not None:
        flags = {
            k: getattr(args, k, None)
            for k in (
                "tls_cert",
                "tls_key",
                "tls_ca",
                "tls_client_auth",
                "etcd_ca",
                "etcd_user",
                "insecure",
                "tokens_file",
            )
        }
        for secret in ("cluster_token", "etcd_password", "token"):
            flags[secret + "_file"] = getattr(args, secret + "_file", None)
        values.update(_from_mapping({k: v for k, v in flags.items() if v is not None}, "flags"))
    security = Security(**values)
    security.check()
    return security


def export_to_environment(security: Security, environ=None) -> None:
    """Put the resolved settings into the environment, for the processes this one starts."""
    environ = os.environ if environ is None else environ
    environ.pop(CONFIG_ENV, None)  # everything it said is in the variables now
    for name, var in ENV.items():
        value = getattr(security, name)
        if name in BOOLEANS:
            value = "1" if value else ""
        elif name in LISTS:
            value = ",".join(value)
        if value:
            environ[var] = value
        else:
            environ.pop(var, None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(security: Security, host: str, role: str, needs_tokens: bool = False) -> None:
    """Refuse to serve plaintext or unauthenticated ports on an address others can reach."""
    if is_loopback(host) or security.insecure:
        return
    missing = []
    if not security.tls_cert:
        missing.append("TLS (--tls-cert, --tls-key, --tls-ca)")
    if not security.members_checked:
        missing.append("member authentication (--tls-client-auth or --cluster-token-file)")
    if needs_tokens and not security.tokens_file:
        missing.append("user tokens (--tokens-file)")
    if missing:
        raise SecurityError(
            f"{role} would listen on {host} without {' and '.join(missing)}: anyone who can "
            "reach the port could join the cluster or run jobs. Configure them, or pass "
            "--insecure to accept that on a trusted network"
        )


_current: Security | None = None


def current() -> Security:
    """This process's settings: what :func:`use` set, else the environment's."""
    global _current
    if _current is None:
        _current = resolve(None)
    return _current


def use(security: Security) -> None:
    """Make ``security`` this process's settings, and its children's (environment)."""
    global _current
    _current = security
    export_to_environment(security)


def configure_daemon(
    args: argparse.Namespace, host: str, role: str, needs_tokens: bool = False
) -> Security:
    """Resolve, check and adopt a daemon's settings; exit with the reason if they are unsafe."""
    try:
        security = resolve(args)
        check_exposure(security, host, role, needs_tokens)
        if security.members_checked and not (security.job_secret or security.cluster_token):
            raise SecurityError(
                "members are checked but nothing signs job credentials: set job_secret_file "
                "(or cluster_token_file), the same on every daemon; training processes prove "
                "their job with credentials it signs"
            )
    except SecurityError as exc:
        print(f"elasticd {role}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc  # bad input, as for every CLI error
    use(security)
    return security
