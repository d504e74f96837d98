"""A PS SIGKILLed while its checkpoint shard uploads to S3: the previous checkpoint is restored.

A real local cluster checkpoints to a moto S3 server of this test alone. The
test SIGSTOPs that server, so the next checkpoint's uploads hang, lets the
job train past the point where that checkpoint was asked for, SIGKILLs a PS,
then lets S3 answer again. The half-uploaded checkpoint must never become one
(no manifest), and the job must be restored from the last checkpoint that was
committed, then complete.
"""

from __future__ import annotations

import os
import signal

from elasticd.checkpoint import CheckpointStore
from elasticd.retry import wait_until
from tests.test_ps_failures import StateLog, start
from tests.test_ps_restore import record

STEPS = 1500
EVERY = 40


def test_a_ps_killed_during_its_upload_leaves_the_previous_checkpoint(cluster, private_s3):
    c = cluster(ps=2, agents=1)
    url = f"{private_s3.url}/ckpt"
    client, job_id = start(c, steps=STEPS, checkpoint={"url": url, "every_steps": EVERY})
    states = StateLog(c, job_id)
    try:
        wait_until(lambda: record(c, job_id).checkpoint_step >= 2 * EVERY, 90, "checkpoints")
        os.kill(private_s3.proc.pid, signal.SIGSTOP)
        try:
            stopped_at = record(c, job_id).checkpoint_step
            # Training goes on; the checkpoint asked for meanwhile hangs in its upload.
            wait_until(
                lambda: client.get(job_id).step >= stopped_at + 3 * EVERY, 60, "a due checkpoint"
            )
            # The newest checkpoint whose commit finished before S3 stopped. One checkpoint is
            # written at a time, so the one hanging now was asked for after it.
            committed = record(c, job_id).checkpoint_step
            c.kill("ps-1", signal.SIGKILL)
        finally:
            os.kill(private_s3.proc.pid, signal.SIGCONT)

        restored = wait_until(
            lambda: (r := record(c, job_id)).restored_generation and r, 90, "a restore"
        )
        store = CheckpointStore(url)
        manifests = store.list_manifests(job_id)
        assert all(store.verify(m) for m in manifests)  # no half-written checkpoint exists
        # Restored from that checkpoint, or from the hanging one if only its manifest was
        # still on its way when S3 stopped (then every shard was written: it is whole). Never
        # from anything newer: the hanging one was asked for about EVERY steps after it.
        assert committed <= restored.restored_step < committed + 2 * EVERY
        assert restored.restored_from == store.url_of(
            next(m for m in manifests if m.step == restored.restored_step)
        )
        final = wait_until(
            lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED") and r,
            180,
            "the job to end",
        )
        assert (final.state, final.step) == ("COMPLETED", STEPS), final.message
        assert "FAILED" not in states.seen()
    finally:
        states.close()
        client.close()
