"""Start a child process that dies with its parent, without running Python between fork and exec.

A ``preexec_fn`` makes :mod:`subprocess` fork the whole parent instead of
vfork-ing it. In a parent with gRPC channels or servers, fork runs gRPC's
fork handlers, which restart its poller thread in the child; when
``close_fds`` then closes the poller's epoll descriptor, the child aborts
before it reaches exec (grpcio 1.81 and later: grpc/grpc#43055). Seen here as a
training process exiting with SIGABRT a millisecond after the agent started it.

So the child runs no Python of ours before exec: ``start_new_session`` makes it
a process-group leader (done in C, vfork stays usable), and a small shim that
runs as the new process sets the parent-death signal and then execs the real
command. The shim also exits at once if its parent already died before the
signal was armed, so nothing outlives the process that started it.

A process to run as another user (``user=(uid, gid)``) changes user in that
shim too, before exec: its supplementary groups dropped, then its group, then
its user. :mod:`subprocess`'s own ``user=`` would do it between fork and exec
(it cannot vfork then), and would have to arm the parent-death signal before
the change of user, which clears it; the shim arms it after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1
_SHIM = f"""
import ctypes, os, signal, sys
if sys.argv[2]:  # uid:gid, before the parent-death signal: a change of user clears it
    uid, gid = (int(n) for n in sys.argv[2].split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
try:
    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
# Python ignores these at start-up, and exec keeps what is ignored: give them back.
for sig in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(sig, signal.SIG_DFL)
try:
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as exc:
    sys.stderr.write(f"cannot run {{sys.argv[3]!r}}: {{exc}}\\n")
    os._exit(127)
"""


def dies_with_parent(argv: Sequence[str], user: tuple[int, int] | None = None) -> list[str]:
    """``argv`` wrapped so that its process is SIGKILLed when this process exits
    (and runs as ``user``, a (uid, gid), if given)."""
    creds = f"{user[0]}:{user[1]}" if user is not None else ""
    return [sys.executable, "-S", "-c", _SHIM, str(os.getpid()), creds, *argv]


def spawn(
    argv: Sequence[str], user: tuple[int, int] | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Popen ``argv`` in its own process group, tied to this process's life, as ``user``
    (uid, gid; None: this process's) with no supplementary groups."""
    if "preexec_fn" in popen_kwargs:
        raise TypeError("spawn runs no preexec_fn: it would make the child fork gRPC's threads")
    return subprocess.Popen(dies_with_parent(argv, user), start_new_session=True, **popen_kwargs)
