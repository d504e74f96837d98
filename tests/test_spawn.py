"""Children started by agents and local clusters: no fork of gRPC's threads, no orphans.

A preexec_fn made subprocess fork a parent full of gRPC threads; gRPC's fork
handlers then ran and, now and then, the child aborted before exec (a training
process dead with SIGABRT a millisecond after its start) and the parent's own
calls broke. Both are checked here against a gRPC server and client kept busy
in this very process, as an agent's are.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc

from elasticd.retry import wait_until
from elasticd.spawn import spawn

CHILDREN = 60


def test_spawning_beside_busy_grpc_threads_never_forks_them(capfd):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    echo_handler = grpc.unary_unary_rpc_method_handler(lambda request, _ctx: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Echo": echo_handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    echo = channel.unary_unary("/test.Echo/Echo")
    stop = threading.Event()
    errors: list[BaseException] = []
    calls = [0]

    def busy() -> None:
        while not stop.is_set():
            try:
                echo(b"x" * 128, timeout=10)
                calls[0] += 1
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: calls[0] > 10, 10, "RPCs under way")
        codes = [
            spawn(["/bin/true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait()
            for _ in range(CHILDREN)
        ]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        channel.close()
        server.stop(None).wait()
    assert codes == [0] * CHILDREN
    assert errors == []
    # gRPC logs this from its fork handlers: they must never have run.
    assert "fork() handlers" not in capfd.readouterr().err


PARENT = """
import sys, time
from elasticd.spawn import spawn
child = spawn(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_dies_with_the_process_that_started_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert os.getpgid(child) == child  # its own process group, for stops
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            # a zombie reparented to init is gone too
            with open(f"/proc/{child}/stat") as f:
                return f.read().split(") ", 1)[1].startswith("Z")

        wait_until(gone, 10, "the orphaned child to die")
    finally:
        parent.kill()
        parent.wait()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_child_gets_default_signals_and_a_clear_error_when_it_cannot_run():
    # Python ignores SIGPIPE and SIGXFSZ; a program it starts must not inherit that.
    out = spawn(["grep", "SigIgn", "/proc/self/status"], stdout=subprocess.PIPE).communicate()[0]
    ignored = int(out.split()[1], 16)  # bit n-1 stands for signal n
    # Only these two: signals the test runner itself ignores (nohup, a background job) stay so.
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), hex(ignored)
    missing = spawn(["/nonexistent/elasticd-test"], stderr=subprocess.PIPE)
    assert missing.wait(timeout=30) == 127
    assert b"cannot run '/nonexistent/elasticd-test'" in missing.stderr.read()
