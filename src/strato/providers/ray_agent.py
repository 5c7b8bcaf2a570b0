"""The strato worker agent of one Ray node, and the Ray actor that runs it.

``NodeAgent`` is created by the ``ray`` provider (``ray.py``) as an actor pinned to its Ray
node (``NodeAffinitySchedulingStrategy(node_id, soft=False)``), holding the CPUs, memory
and GPUs strato uses there. It runs the worker agent as a child process
(``python -m strato.providers.ray_agent SPEC``) that joins the control plane over TCP with
a join token, declares the inventory the provider read from Ray, and exits when the actor
is gone (it watches its parent's pid), which is also how a Ray node's death reaches the
control plane: the agent's connection closes and the node is lost there.

The actor supervises its agent like the ``local`` provider does: a dead agent's container
processes are killed and a new agent is started after a backoff that doubles from
``STRATO_WORKER_RESTART_BACKOFF``.

This module must not import the control plane: it runs on every Ray node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("strato.providers.ray")

STOP_GRACE_S = 15.0


@dataclass
class AgentSpec:
    """What the provider tells one node's agent (sent to the actor, then to the agent)."""

    name: str  # the strato node's name: ``ray-<first 12 hex digits of the Ray node id>``
    ray_node_id: str
    channel: str  # ``tcp:HOST:PORT``: the control plane's agent listener
    server_url: str  # its HTTP API (code, blobs)
    join_token: str
    cpu: float
    memory_mb: int
    gpu_count: int = 0
    gpu_type: str | None = None  # from Ray's ``accelerator_type:X`` resource, canonical
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # STRATO_* worker settings
    agent_home: str = ""  # "": STRATO_RAY_AGENT_HOME's default on the node

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AgentSpec:
        return cls(**json.loads(text))


def node_home(spec: AgentSpec) -> Path:
    """This node's agent home: ``<STRATO_RAY_AGENT_HOME or tmp/strato-ray-UID>/<name>``."""
    root = (
        Path(spec.agent_home)
        if spec.agent_home
        else Path(tempfile.gettempdir()) / f"strato-ray-{os.getuid()}"
    )
    return root / spec.name


def gpu_inventory(spec: AgentSpec, ray_gpu_ids: list[Any]) -> dict[str, list[int]]:
    """The GPUs this agent offers: those Ray assigned to its actor (physical indices),
    named by Ray's accelerator type, else by ``nvidia-smi``, else ``"GPU"``."""
    ids = sorted(int(i) for i in ray_gpu_ids)[: spec.gpu_count] if spec.gpu_count else []
    if not ids:
        return {}
    if spec.gpu_type:
        return {spec.gpu_type: ids}
    from strato.worker.resources import parse_nvidia_smi, query_nvidia_smi

    found = parse_nvidia_smi(query_nvidia_smi() or "")
    by_index = {i: t for t, indices in found.items() for i in indices}
    gpus: dict[str, list[int]] = {}
    for i in ids:
        gpus.setdefault(by_index.get(i, "GPU"), []).append(i)
    return gpus


class NodeAgent:
    """The Ray actor of one node: starts, supervises and stops its strato worker agent."""

    def __init__(self, spec_json: str) -> None:
        from strato import settings
        from strato.providers.local import Backoff

        self.spec = AgentSpec.from_json(spec_json)
        self.home = node_home(self.spec)
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.home / "logs").mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.home, 0o700)
        gpu_ids: list[Any] = []
        if "ray" in sys.modules:  # in a Ray worker (never start Ray to ask)
            ray = sys.modules["ray"]
            if ray.is_initialized():
                gpu_ids = list(ray.get_gpu_ids())
        self.gpus = gpu_inventory(self.spec, gpu_ids)
        self.backoff = Backoff(
            *settings.WORKER_RESTART_BACKOFF.get(), settings.WORKER_RESTART_RESET_S.get()
        )
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._start()
        self._thread = threading.Thread(target=self._supervise, name="strato-agent", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATO_")}
        env.pop("CUDA_VISIBLE_DEVICES", None)  # strato's runtime gives containers theirs
        env.update(self.spec.env)
        env.update(STRATO_HOME=str(self.home), STRATO_WORKER_PARENT_PID=str(os.getpid()))
        spec = {**asdict(self.spec), "gpus": self.gpus}
        fd = os.open(self.home / "logs" / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "strato.providers.ray_agent", json.dumps(spec)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # it outlives a SIGKILLed actor long enough to
                umask=0o022,  # stop its containers (it watches this process's pid)
            )
        finally:
            os.close(fd)
        self.started_at = time.monotonic()

    def _supervise(self) -> None:
        from strato.providers.local import kill_orphans

        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            while proc.poll() is None:
                if self._stopping.wait(0.25):
                    return
            uptime = time.monotonic() - self.started_at
            orphans = kill_orphans(f"unix:{self.home / 'run' / 'relay.sock'}")
            delay = self.backoff.next_delay(uptime)
            log.warning(
                "the strato worker agent of %s (pid %s) died (code %s) after %.1fs; %d "
                "container process(es) killed; restarting it in %.1fs",
                self.spec.name,
                proc.pid,
                proc.returncode,
                uptime,
                orphans,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._start()
                    self.restarts += 1
                except OSError:
                    log.exception("could not start the worker agent; trying again")
                    self.started_at = time.monotonic()

    def info(self) -> dict[str, Any]:
        """The agent's pid, restarts, home and GPUs (also the provider's liveness ping)."""
        proc = self.proc
        return {
            "name": self.spec.name,
            "pid": proc.pid if proc is not None else None,
            "actor_pid": os.getpid(),
            "alive": proc is not None and proc.poll() is None,
            "restarts": self.restarts,
            "home": str(self.home),
            "gpus": self.gpus,
        }

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """Stop the agent (it stops its containers first); returns its exit status."""
        with self._lock:
            self._stopping.set()
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode


# ---------------------------------------------------------------------------------------
# The agent process


def main(argv: list[str] | None = None) -> None:
    """``python -m strato.providers.ray_agent SPEC_JSON``: run one Ray node's agent."""
    from strato import settings
    from strato.client.tls import client_context
    from strato.worker.agent import WorkerAgent
    from strato.worker.resources import NodeInventory

    logging.basicConfig(
        level=settings.LOG_LEVEL.get(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raw = json.loads((argv or sys.argv[1:])[0])
    gpus = {k: [int(i) for i in v] for k, v in raw.pop("gpus", {}).items()}
    spec = AgentSpec(**raw)
    inventory = NodeInventory(
        cpu=spec.cpu, memory_mb=spec.memory_mb, gpus=gpus, labels=dict(spec.labels)
    )
    ca = settings.TLS_CA.get()  # the control plane speaks TLS (verified: its CA, else the system's)
    tls = client_context(ca) if ca or spec.server_url.startswith("https:") else None
    agent = WorkerAgent(
        spec.channel,
        spec.join_token,
        settings.HOME.get(),
        name=spec.name,
        provider="ray",
        parent_pid=settings.WORKER_PARENT_PID.get(),
        server_url=spec.server_url,
        tls=tls,
        labels=dict(spec.labels),
        inventory=inventory,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
