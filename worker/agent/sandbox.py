"""Where a training process runs on its node: its job's directory, its user, its environment.

* **A per-job working directory** (:meth:`Sandbox.job_dir`):
  ``<work-dir>/<job>``, mode 0700, owned by the run-as user, created by the
  agent. The training interpreter starts with ``-P`` (:mod:`.launch`), so
  that directory is never on ``sys.path``.
* **The environment and user** every training process starts with, warm
  ones included: :mod:`elasticd.security.confinement` (an allow list; the
  ``--run-as`` user). Its log files are opened by the agent; what it writes
  (its heartbeat) lives in its job's directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from elasticd.security.config import current
from elasticd.security.confinement import ConfinementError, RunAs, training_environment

WORK_DIR_MODE = 0o711  # the run-as user reaches its job's directory, lists none
WORK_SUBDIR = ".work"  # the default work directory, in the log directory (the agent writes there)


class SandboxError(ConfinementError):
    """The sandbox cannot be set up as asked (a bad job directory, an unreachable work dir)."""


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
