"""Keep other processes of the same user out of this one's memory and ``/proc`` files.

Training processes of several jobs may run as one user (``elasticd agent
--run-as``). A process of the same user may read another's
``/proc/<pid>/environ``, ``mem`` and ``maps`` or ptrace it, unless it is
marked non-dumpable: then those files belong to root and ptrace is refused
to anybody without CAP_SYS_PTRACE. The runtime marks itself so before it
reads anything from its agent (its assignment, its job's credential).
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def forbid_inspection() -> bool:
    """Mark this process non-dumpable (Linux); False where that cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
