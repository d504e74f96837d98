"""TLS, tokens and who may call what: see :mod:`elasticd.security.config`."""

from elasticd.security.channels import open_channel
from elasticd.security.config import (
    Security,
    SecurityError,
    add_security_arguments,
    check_exposure,
    current,
    export_to_environment,
    resolve,
    use,
)
from elasticd.security.gate import Gate, caller_identity

__all__ = [
    "Gate",
    "Security",
    "SecurityError",
    "add_security_arguments",
    "caller_identity",
    "check_exposure",
    "current",
    "export_to_environment",
    "open_channel",
    "resolve",
    "use",
]
