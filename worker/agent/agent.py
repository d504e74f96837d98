"""The node agent: advertises the node, runs what is assigned to it, reports states.

It registers ``<prefix>/nodes/<node_id>`` on its session lease, watches its
assignments, and makes the running processes match them:

* a member of a new generation that has no process gets one;
* a running process whose generation changed is told the new assignment on
  its control pipe and carries on (its state stays in memory);
* a process no longer assigned is stopped;
* a process that exits non-zero is restarted, up to the job's max_restarts;
  after that it is reported FAILED and the controller decides. In ps-async
  mode the restart is immediate (the state is on the PS tier). In allreduce
  the replacement starts at once as a standby: reported RESTARTING while it
  imports and builds its model, READY once it says so on its ready pipe; the
  controller seals it into a generation only then, so the survivors never wait
  on a process that is starting (the controller lists it under ``standby`` in
  the node's assignment meanwhile, and lists an allreduce job's running
  processes there too when the job falls below ``workers.min``: they are sent
  that generation, which leaves them out, and wait at a step boundary with the
  replica). In script mode it is reported RESTARTING and every process
  restarts in the next generation;
* in script mode every process is restarted when the generation changes, with
  the restart count raised, as torchrun does.

On SIGTERM or a drain request (:mod:`.drain_request`) the agent drains
(:mod:`.drain`, :mod:`.node_drain`): it marks its node draining, launches
nothing more, stops each process once the controller has sealed a generation
without it, and exits once none is left. The node's registration is
:mod:`.registration`; hung processes are found by :mod:`.hang_watch`.

Worker states go to ``<prefix>/workers/<job>/<worker>`` on the agent's
lease, written when they change, so they vanish with the agent.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from elasticd.coord.cache import PrefixCache
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import Keys
from elasticd.coord.session import Session
from elasticd.membership import WorkerReport
from elasticd.rpc import agent_pb2, agent_pb2_grpc
from elasticd.serving import service_name, start_grpc_server
from elasticd.worker.agent.api import FAILED, READY, RESTARTING, RUNNING, SUCCEEDED, Exited
from elasticd.worker.agent.drain_request import DrainRequests
from elasticd.worker.agent.fault_injection import FaultExecutor
from elasticd.worker.agent.hang_watch import kill_hung
from elasticd.worker.agent.launch import (
    RUNTIME_ARGV,
    for_worker,
    heartbeat_path,
    process_spec,
    script_imports,
)
from elasticd.worker.agent.registration import NodeRegistration
from elasticd.worker.agent.sandbox import WORK_SUBDIR, Sandbox, SandboxError
from elasticd.worker.agent.status_service import NodeAgentServicer
from elasticd.worker.agent.supervisor import ProcessSupervisor

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """What the agent knows about one worker of one job on this node."""

    job_id: str
    worker_id: str
    generation: int
    assignment: dict
    restarts: int = 0
    state: str = RUNNING
    exit_code: int | None = None
    pid: int = 0
    standby: bool = False  # a replacement not yet let into a generation


class NodeAgent:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        node_id: str,
        slots: int,
        log_dir: str,
        lease_ttl: int,
        address: str = "",
        warm: int | None = None,
        allow_chaos: bool = False,
        host: str = "",
        port: int = 0,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.host = host or address  # where the agent's gRPC service listens
        self.address = address  # what the cluster dials: registration, rendezvous host
        self.port = port  # of the NodeAgent gRPC service; 0: any free port
        self.allow_chaos = allow_chaos  # serve InjectFault (`elasticd chaos`)
        self.client = client
        self.keys = keys
        self.node_id = node_id
        self.slots = slots
        self.log_dir = Path(log_dir)
        self.session = Session(client, ttl=lease_ttl, name=f"agent-{node_id}")
        self._wake = threading.Event()
        self.assignments = PrefixCache(client, keys.assignments(node_id), self._wake.set)
        self.drain_requests = DrainRequests(client, keys, node_id, self._wake.set)
        self.registration = NodeRegistration(self.session, keys, node_id)
        self.draining = False  # launches nothing more; leaves once nothing runs
        self._stopping = False  # exits are ours: neither restarted nor reported
        # What a training process gets: environment, user, per-job directory.
        self.sandbox = sandbox or Sandbox.unconfined(self.log_dir / WORK_SUBDIR)
        # A warm interpreter per slot (``warm``: how many; default one per slot), each of
        # one job, so a restart costs neither interpreter nor torch start-up.
        self.supervisor = ProcessSupervisor(
            self._on_exit,
            self._on_ready,
            warm=slots if warm is None else warm,
            warm_argv=RUNTIME_ARGV,
            warm_log_dir=str(self.log_dir / "warm"),
            sandbox=self.sandbox,
        )
        self._slots: dict[tuple[str, str], Slot] = {}
        # restarts used per (job, worker), kept while a slot is out of a generation
        self._restarts: dict[tuple[str, str], int] = {}
        self.restarts_total = 0  # processes restarted since the agent started (metrics)
        self._lock = threading.RLock()
        self._server = None  # the NodeAgent gRPC service, started by start()

    def start(self) -> NodeAgent:
        self.session.start()
        self._server, port = start_grpc_server(
            lambda s: agent_pb2_grpc.add_NodeAgentServicer_to_server(
                NodeAgentServicer(
                    self.worker_state, FaultExecutor(self.node_id) if self.allow_chaos else None
                ),
                s,
            ),
            self.host or socket.gethostname(),
            self.port,
            [service_name(agent_pb2, "NodeAgent")],
        )
        self.drain_requests.clear()
        self.registration.register(self.slots, self.address, port)
        self.assignments.start()
        self.drain_requests.start()
        return self

    def slots_snapshot(self) -> list[Slot]:
        """The slots this node holds now (for metrics)."""
        with self._lock:
            return list(self._slots.values())

    def worker_state(self, job_id: str, worker_id: str) -> tuple[str, int, int]:
        """(state, pid, generation) of a worker of this node; ("", 0, 0) if it has none."""
        with self._lock:
            slot = self._slots.get((job_id, worker_id))
            if slot is None:
                return "", 0, 0
            pid = self.supervisor.pid((job_id, worker_id)) or 0
            return slot.state, pid, slot.generation

    def run(self, stop: threading.Event) -> None:
        """Reconcile until ``stop`` is set (SIGTERM) or a drain is requested."""
        while not stop.is_set() and not self.drain_requests.requested():
            with self._lock:
                running = [s for s in self._slots.values() if s.state == RUNNING]
            kill_hung(running, self._heartbeat_of, self.supervisor.kill)
            try:
                self.reconcile()
            except EtcdError as exc:
                log.warning("event=agent_reconcile_failed node=%s error=%s", self.node_id, exc)
            self.wait_for_change(1.0)

    def mark_draining(self) -> None:
        """Launch nothing more, and advertise the node as draining: no job chooses it."""
        self.draining = True
        self.registration.mark_draining()

    def wake(self) -> None:
        """Reconcile now (a stop signal came). Safe in a signal handler: the event is set
        from another thread, as the main thread may hold the event's lock when the
        handler runs."""
        threading.Thread(target=self._wake.set, name="wake", daemon=True).start()

    def wait_for_change(self, timeout_s: float) -> None:
        """Sleep until an assignment or drain request changes, or ``timeout_s``."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        self.assignments.stop()
        self.drain_requests.stop()
        self.supervisor.stop_all()
        self.session.close()
        self.drain_requests.withdraw()
        if self._server is not None:
            self._server.stop(grace=1).wait()

    # -- reconcile ------------------------------------------------------------

    def reconcile(self) -> None:
        wanted: dict[tuple[str, str], dict] = {}
        standby: dict[tuple[str, str], dict] = {}
        for job_id, raw in self.assignments.items().items():
            assignment = json.loads(raw)
            for member in assignment["members"]:
                wanted[(job_id, member["worker_id"])] = for_worker(assignment, member["worker_id"])
            for w in assignment.get("standby", ()):
                standby[(job_id, w)] = for_worker(assignment, w)
            if assignment["spec"]["mode"] != "script":
                self.supervisor.preload(job_id, assignment["spec"]["task"])
            else:
                for module in script_imports(assignment["spec"]["script"]["path"]):
                    self.supervisor.preload(job_id, module)
        self.supervisor.keep_jobs({job_id for job_id, _ in (*wanted, *standby)})
        with self._lock:
            for key in list(self._slots):
                if key not in wanted and key not in standby:
                    self._withdraw(key)
            jobs_gone = {k for k in self._restarts if k[0] not in self.assignments_jobs(wanted)}
            for key in jobs_gone:
                del self._restarts[key]
            for key, assignment in wanted.items():
                slot = self._slots.get(key)
                if self.draining and (slot is None or slot.standby or slot.state == RESTARTING):
                    continue  # launches nothing more: the controller takes it out
                if slot is None:
                    self._launch(key, assignment)
                elif slot.standby and slot.generation != assignment["generation"]:
                    self._admit(slot, assignment)
                elif slot.generation != assignment["generation"] and (
                    slot.state == RESTARTING or assignment["spec"]["mode"] == "script"
                ):
                    # A new generation: the group re-forms with a fresh process.
                    self._relaunch(slot, assignment)
                elif slot.generation != assignment["generation"] or slot.assignment != assignment:
                    self._update(slot, assignment)
            for key, assignment in standby.items():
                slot = self._slots.get(key)
                if slot and slot.state == RUNNING and slot.generation < assignment["generation"]:
                    self._hold(slot, assignment)

    @staticmethod
    def assignments_jobs(wanted: dict[tuple[str, str], dict]) -> set[str]:
        return {job_id for job_id, _ in wanted}

    def _relaunch(self, slot: Slot, assignment: dict) -> None:
        key = (slot.job_id, slot.worker_id)
        if slot.state != RESTARTING:
            self._restarts[key] = slot.restarts + 1
        self._slots.pop(key)
        self.supervisor.stop(key)
        self._launch(key, assignment)

    def _admit(self, slot: Slot, assignment: dict) -> None:
        """A standby is in a generation: it trains in it, unless the job changed mode."""
        if assignment["spec"]["mode"] != slot.assignment["spec"]["mode"]:
            self._relaunch(replace(slot, state=RESTARTING), assignment)
            return
        slot.standby = False
        slot.state = RUNNING
        self._update(slot, assignment)

    def _launch(self, key: tuple[str, str], assignment: dict, standby: bool = False) -> None:
        job_id, wid = key
        restarts = self._restarts.get(key, 0)
        slot = Slot(job_id, wid, assignment["generation"], assignment, restarts=restarts)
        if standby:
            slot.state, slot.standby = RESTARTING, True
        self._slots[key] = slot
        log_path = str(self.log_dir / job_id / f"{wid}.log")
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._heartbeat_of(job_id, wid))  # a new process is judged by its own beats
        try:
            job_dir = self.sandbox.job_dir(job_id)
            spec = process_spec(assignment, wid, restarts, log_path, self.address, job_dir)
            first = {"assignment": assignment, "standby": standby}
            pid = self.supervisor.start(spec, first_message=first)
        except (OSError, SandboxError) as exc:
            log.error("event=launch_failed job=%s worker=%s error=%s", job_id, wid, exc)
            slot.state, slot.exit_code = FAILED, -1
            self._report(slot)
            return
        slot.pid = pid
        log.info(
            "event=worker_launched job=%s generation=%d node=%s worker=%s pid=%d restarts=%d "
            "standby=%s",
            job_id,
            slot.generation,
            self.node_id,
            wid,
            pid,
            restarts,
            standby,
        )
        self._report(slot, pid)

    def _heartbeat_of(self, job_id: str, worker_id: str) -> str:
        return heartbeat_path(str(self.sandbox.work_dir / job_id), worker_id)

    def _update(self, slot: Slot, assignment: dict) -> None:
        slot.generation = assignment["generation"]
        slot.assignment = assignment
        if slot.state == RUNNING:
            self.supervisor.send((slot.job_id, slot.worker_id), {"assignment": assignment})
        self._report(slot)

    def _hold(self, slot: Slot, assignment: dict) -> None:
        """Tell a process kept out of the new generation (it holds an allreduce replica) to
        stop stepping; its slot keeps the assignment it trained in, for a restart."""
        slot.generation = assignment["generation"]
        self.supervisor.send((slot.job_id, slot.worker_id), {"assignment": assignment})
        self._report(slot)

    def _withdraw(self, key: tuple[str, str]) -> None:
        slot = self._slots.pop(key)
        stop = functools.partial(self.supervisor.stop, key, pid=self.supervisor.pid(key))
        threading.Thread(target=stop, daemon=True).start()
        try:
            self.session.forget(self.keys.worker(slot.job_id, slot.worker_id))
        except EtcdError:
            pass

    def _on_exit(self, event: Exited) -> None:
        with self._lock:
            slot = self._slots.get(event.key)
            if self._stopping or slot is None or slot.pid != event.pid:
                return  # withdrawn, replaced, or the agent is stopping: we stopped it
            slot.exit_code = event.code
            if self.draining and event.code != 0:
                self._slots.pop(event.key)  # not restarted, nor a failure of the job
                return
            max_restarts = int(slot.assignment["spec"].get("max_restarts", 0))
            if event.code == 0:
                slot.state = SUCCEEDED
            elif slot.restarts < max_restarts:
                log.warning(
                    "event=worker_restart job=%s worker=%s code=%d restart=%d",
                    slot.job_id,
                    slot.worker_id,
                    event.code,
                    slot.restarts + 1,
                )
                self._restarts[event.key] = slot.restarts + 1
                self.restarts_total += 1
                mode = slot.assignment["spec"]["mode"]
                if mode in ("ps-async", "allreduce"):
                    # ps-async: at once, its state is on the PS tier. allreduce: as a
                    # standby, let in by the controller once it is ready.
                    self._slots.pop(event.key)
                    self._launch(event.key, slot.assignment, standby=mode == "allreduce")
                    return
                slot.state = RESTARTING
            else:
                slot.state = FAILED
            self._report(slot)

    def _on_ready(self, key: tuple[str, str], pid: int) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.pid != pid or not slot.standby or slot.state != RESTARTING:
                return
            slot.state = READY
            log.info(
                "event=standby_ready job=%s worker=%s pid=%d generation=%d",
                key[0],
                key[1],
                pid,
                slot.generation,
            )
            self._report(slot)

    def _report(self, slot: Slot, pid: int | None = None) -> None:
        report = WorkerReport(
            worker_id=slot.worker_id,
            node_id=self.node_id,
            generation=slot.generation,
            state=slot.state,
            restarts=slot.restarts,
            exit_code=slot.exit_code,
            pid=pid or self.supervisor.pid((slot.job_id, slot.worker_id)) or 0,
        )
        try:
            self.session.put(self.keys.worker(slot.job_id, slot.worker_id), report.to_json())
        except EtcdError as exc:
            # Kept in the session: it is put again when etcd is back.
            log.warning(
                "event=report_deferred job=%s worker=%s error=%s", slot.job_id, slot.worker_id, exc
            )
