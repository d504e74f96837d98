"""A daemon's signals: SIGTERM stops it whichever thread it lands on; SIGUSR1 dumps stacks."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from elasticd.retry import wait_until

# The main thread waits on the stop signal with SIGTERM blocked, so that the kernel
# must deliver it to the other thread, as it may to one of gRPC's in a daemon.
PROGRAM = """
import signal, threading, time
from elasticd.logs import configure_logging
from elasticd.serving import wait_for_stop_signal

configure_logging("t")
stop = wait_for_stop_signal()
threading.Thread(target=time.sleep, args=(3600,), name="bystander", daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print("waiting", flush=True)
stop.wait()
print("stopped", flush=True)
"""


@pytest.fixture
def program():
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "waiting\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_delivered_to_another_thread_stops_the_main_wait(program) -> None:
    program.send_signal(signal.SIGTERM)
    out, err = program.communicate(timeout=30)
    assert (out, program.returncode) == ("stopped\n", 0), err
    assert "event=signal signal=SIGTERM" in err


def test_sigusr1_writes_every_threads_stack_and_the_daemon_goes_on(program) -> None:
    program.send_signal(signal.SIGUSR1)
    lines: list[str] = []

    def dumped() -> bool:
        lines.append(program.stderr.readline())
        return "in wait" in lines[-1] and "serving.py" in lines[-1]

    wait_until(dumped, 30, "the main thread's stack")
    assert program.poll() is None  # still waiting
    assert any("Thread 0x" in line for line in lines), lines
    program.send_signal(signal.SIGTERM)
    out, _ = program.communicate(timeout=30)
    assert out == "stopped\n"
