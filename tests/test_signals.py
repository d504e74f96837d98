"""A daemon's signals: SIGTERM stops it whichever thread it lands on; SIGUSR1 dumps stacks."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

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
    # The program prints "waiting" just before it enters its wait, so the first
    # SIGUSR1 may catch the main thread elsewhere: send it again until a dump shows
    # the wait. A reader thread keeps a pipe read from ever blocking the test.
    lines: list[str] = []

    def read() -> None:
        for line in program.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def dumped() -> bool:
        if any("in wait" in line and "serving.py" in line for line in list(lines)):
            return True
        program.send_signal(signal.SIGUSR1)
        return False

    wait_until(dumped, 30, "the main thread's stack in StopSignal.wait", interval=0.5)
    assert program.poll() is None  # still waiting
    assert any("Thread 0x" in line for line in lines), lines
    program.send_signal(signal.SIGTERM)
    assert program.wait(timeout=30) == 0
    reader.join(timeout=30)
    assert program.stdout.read() == "stopped\n"
