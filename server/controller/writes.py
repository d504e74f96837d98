"""Every write about a job is conditional: on the job as it was read, and on leadership.

A transaction here compares the job's status key with the mod revision of
the snapshot the decision was taken on (and the generation key's, for a
seal), and the election key this controller leads with (see
:meth:`elasticd.coord.election.Election.guard`). A write decided on a stale
snapshot, or sent by a leader that has since been deposed, changes nothing:
the first raises :class:`~.errors.Conflict`, the second ``NotLeading``.
After a successful write the controller waits until its own cache has seen
it, so the next decision reads its own writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from elasticd.coord.election import NotLeading
from elasticd.coord.etcd import Compare, Delete, EtcdClient, Put
from elasticd.coord.keys import Keys
from elasticd.server.controller.errors import Conflict
from elasticd.server.controller.planning import JobSnapshot

log = logging.getLogger(__name__)

Op = Put | Delete


class JobWriter:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        guard: Callable[[], list[Compare]],
        still_leading: Callable[[], bool],
        wait_for_revision: Callable[[int], None],
    ) -> None:
        self.client = client
        self.keys = keys
        self._guard = guard
        self._still_leading = still_leading
        self._wait = wait_for_revision

    def create(self, job_id: str, ops: Sequence[Op]) -> int:
        """Admit a new job: only if its spec key does not exist yet."""
        return self._commit([Compare(self.keys.job_spec(job_id), "version", "==", 0)], ops, job_id)

    def create_key(self, job_id: str, put: Put) -> bool:
        """Write ``put`` only if its key does not exist yet. False if it already did."""
        compare = [Compare(put.key, "version", "==", 0)]
        try:
            self._commit(compare, [put], job_id)
        except Conflict:
            return False
        return True

    def update(self, snap: JobSnapshot, ops: Sequence[Op], generation: bool = False) -> int:
        """Write ``ops`` if the job's record (and with ``generation``, its generation)
        is still what ``snap`` read. Returns the revision of the write."""
        job_id = snap.record.job_id
        compare = [Compare(self.keys.job_status(job_id), "mod", "==", snap.revision)]
        if generation:
            compare.append(
                Compare(self.keys.generation(job_id), "mod", "==", snap.generation_revision)
            )
        return self._commit(compare, ops, job_id)

    def _commit(self, compare: list[Compare], ops: Sequence[Op], job_id: str) -> int:
        guard = self._guard()  # raises NotLeading before anything is sent
        ok, revision = self.client.transaction([*compare, *guard], list(ops))
        if not ok:
            self._wait(revision)  # the next snapshot shows what we lost to
            if not self._still_leading():
                raise NotLeading(f"leadership lost before a write about job {job_id}")
            raise Conflict(f"job {job_id} changed since it was read (etcd revision {revision})")
        if any(op.key.startswith(self.keys.jobs) for op in ops):
            # The next snapshot must show this write. A write of nothing the job cache holds
            # (a new leader's assignments only) has nothing to wait for: that cache moves
            # only when a job's own keys change, so waiting would take the whole timeout.
            self._wait(revision)
        return revision
