"""``sim`` providers: one per catalog provider, selling its offers for nothing.

Provisioning an offer waits a provisioning delay, then starts a real worker agent on this
machine (its own ``STRATO_HOME`` under ``$STRATO_HOME/sim/<instance>``; it dials the control
plane's channel like the local agent) that declares the offer's inventory: its CPUs,
memory, GPUs as declared devices (``STRATO_NODE_GPUS``, no ``nvidia-smi``), region, price
and labels (``instance``, ``spot``, ``offer``). Faults (``config.Fault``) apply per
provider, region and GPU type: out of capacity and provisioning errors (the instance
fails), slow provisioning, and spot preemptions (after a time, or replayed from an
availability trace: when the trace's count drops below the spot instances held, the
newest are taken back). A preempted or terminated instance's agent is stopped: it closes
its channel at once (the control plane counts its node lost) and stops its containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .base import (
    FINAL,
    Capabilities,
    Instance,
    InstanceState,
    Offer,
    OnStateChange,
    ProvisionError,
    StateChange,
)
from .config import Fault
from .traces import Trace, load_traces, traces_dir

log = logging.getLogger("strato.providers.sim")

WATCH_S = 0.2
STOP_GRACE_S = 10.0


class SimProvider:
    """The simulated provider ``name`` (a catalog provider)."""

    def __init__(
        self,
        name: str,
        offers: list[Offer],
        *,
        home: Path,
        channel: str,
        token: str,
        on_change: OnStateChange,
        faults: Callable[[], list[Fault]] = list,
        provisioning_delay_s: float = 1.0,
        regions: list[str] | None = None,
    ) -> None:
        self.name = name
        self._offers = [
            o
            for o in offers
            if o.provider == name
            and (
                regions is None
                or any(o.region == r or o.region.startswith(r + "-") for r in regions)
            )
        ]
        self.capabilities = Capabilities(
            provisions=True,
            spot=any(o.spot_price is not None for o in self._offers),
            regions=tuple(sorted({o.region for o in self._offers})),
        )
        self.home = home
        self.channel = channel
        self.token = token
        self.on_change = on_change
        self.faults = faults
        self.delay_s = provisioning_delay_s
        self._instances: dict[str, Instance] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        self._t0 = time.monotonic()
        self._traces: dict[str, Trace] = {}

    # ------------------------------------------------------------------ the interface

    def offers(self) -> list[Offer]:
        return list(self._offers)

    def instances(self) -> list[Instance]:
        return [i for i in self._instances.values() if i.state not in FINAL]

    def provision(self, offer: Offer, *, spot: bool) -> Instance:
        if offer.provider != self.name:
            raise ProvisionError(f"{offer.offer_id} is not an offer of {self.name}")
        if spot and offer.spot_price is None:
            raise ProvisionError(f"{offer.offer_id} is not sold as spot")
        inst = Instance("i-" + secrets.token_hex(5), offer, spot)
        inst.node_name = f"{self.name}-{inst.instance_id}"
        self._instances[inst.instance_id] = inst
        task = asyncio.get_running_loop().create_task(self._provision(inst))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._ensure_watch()
        return inst

    def terminate(self, instance_id: str, reason: str = "released") -> None:
        inst = self._instances.get(instance_id)
        if inst is None or inst.state in FINAL:
            return
        self._end(inst, InstanceState.TERMINATED, reason)

    def close(self) -> None:
        for inst in list(self._instances.values()):
            if inst.state not in FINAL:
                self._end(inst, InstanceState.TERMINATED, "the control plane stopped", wait=True)
        for t in list(self._tasks):
            t.cancel()
        if self._watch is not None:
            self._watch.cancel()

    # ------------------------------------------------------------------ simulation

    def _faults(self, offer: Offer, kind: str) -> list[Fault]:
        return [
            f
            for f in self.faults()
            if f.kind == kind and f.matches(self.name, offer.region, offer.gpu)
        ]

    async def _provision(self, inst: Instance) -> None:
        offer = inst.offer
        delay = self.delay_s + sum(f.delay_s for f in self._faults(offer, "slow") if f.take())
        await asyncio.sleep(delay)
        if inst.state in FINAL:  # terminated while provisioning
            return
        for kind, what in (
            ("out_of_capacity", "out of capacity"),
            ("error", "provisioning error"),
        ):
            if any(f.take() for f in self._faults(offer, kind)):
                self._set(inst, InstanceState.FAILED, f"{offer.offer_id}: {what} (simulated)")
                inst.ended_at = time.monotonic()
                return
        try:
            self._start_agent(inst)
        except OSError as e:
            self._set(inst, InstanceState.FAILED, f"could not start its worker agent: {e}")
            inst.ended_at = time.monotonic()
            return
        inst.running_at = time.monotonic()
        self._set(inst, InstanceState.RUNNING)

    def _start_agent(self, inst: Instance) -> None:
        offer = inst.offer
        home = self.home / "sim" / inst.instance_id
        (home / "logs").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            STRATO_HOME=str(home),
            STRATO_WORKER_CHANNEL=self.channel,
            STRATO_TOKEN=self.token,
            STRATO_WORKER_PARENT_PID=str(os.getpid()),
            STRATO_NODE_PROVIDER=self.name,
            STRATO_NODE_NAME=inst.node_name,
            STRATO_NODE_CPU=f"{offer.cpu:g}",
            STRATO_NODE_MEMORY_MB=str(offer.memory_mb),
            # declared devices: the offer's GPUs, not what this machine has
            STRATO_NODE_GPUS=f"{offer.gpu}:{offer.gpu_count}" if offer.gpu else "",
            STRATO_NODE_REGION=offer.region,
            STRATO_NODE_PRICE_PER_HOUR=f"{inst.price_per_hour:.6f}",
            STRATO_NODE_LABELS=",".join(
                [
                    f"instance={inst.instance_id}",
                    f"spot={int(inst.spot)}",
                    f"zone={offer.zone}",
                    f"instance_type={offer.instance_type}".replace(",", " "),
                ]
            ),
        )
        fd = os.open(home / "logs" / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._procs[inst.instance_id] = subprocess.Popen(
                [sys.executable, "-m", "strato.worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o022,
            )
        finally:
            os.close(fd)

    def preempt(self, instance_id: str, reason: str = "spot capacity taken back") -> None:
        inst = self._instances.get(instance_id)
        if inst is not None and inst.state == InstanceState.RUNNING:
            self._end(inst, InstanceState.PREEMPTED, reason)

    def _end(self, inst: Instance, state: InstanceState, reason: str, wait: bool = False) -> None:
        inst.ended_at = time.monotonic()
        proc = self._procs.pop(inst.instance_id, None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)  # it closes its channel, then stops its containers
            if wait:
                _reap(proc, STOP_GRACE_S)
            else:
                threadless_reap(proc)
        self._set(inst, state, reason)

    def _set(self, inst: Instance, state: InstanceState, reason: str = "") -> None:
        inst.state = state
        inst.reason = reason
        log.info(
            "%s instance %s (%s): %s %s",
            self.name,
            inst.instance_id,
            inst.offer.offer_id,
            state,
            reason,
        )
        try:
            self.on_change(StateChange(inst, state, reason))
        except Exception:  # noqa: BLE001 - a report must not stop the provider
            log.exception("instance state report failed")

    def _ensure_watch(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                self.check(time.monotonic())
            except Exception:  # noqa: BLE001
                log.exception("sim provider %s: check failed", self.name)

    def check(self, now: float) -> None:
        """Agents that died on their own, and preemptions due."""
        for iid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                inst = self._instances[iid]
                self._procs.pop(iid, None)
                if inst.state not in FINAL:
                    self._set(
                        inst,
                        InstanceState.TERMINATED,
                        f"its worker agent exited ({proc.returncode})",
                    )
                    inst.ended_at = now
        running = [
            i for i in self._instances.values() if i.state == InstanceState.RUNNING and i.spot
        ]
        if not running:
            return
        for f in [f for f in self.faults() if f.kind == "preempt"]:
            held = [
                i
                for i in running
                if i.state == InstanceState.RUNNING
                and f.matches(self.name, i.offer.region, i.offer.gpu)
            ]
            if not held:
                continue
            if f.trace:
                trace = self._trace(f.trace)
                if trace is None:
                    continue
                avail = trace.available((now - self._t0) * f.trace_speed)
                excess = len(held) - avail
                for inst in sorted(held, key=lambda i: -(i.running_at or 0))[: max(0, excess)]:
                    self.preempt(inst.instance_id, f"spot capacity taken back (trace {f.trace})")
            elif f.when_file is not None:
                # a cue, not a clock: the preemption lands while the input surely runs, however
                # slowly a busy machine started it (every matching instance: tests hold one)
                if os.path.exists(f.when_file) and f.take():
                    with contextlib.suppress(OSError):
                        os.unlink(f.when_file)
                    for inst in held:
                        self.preempt(inst.instance_id)
            elif f.after_s is not None:
                for inst in held:
                    if now - (inst.running_at or now) >= f.after_s and f.take():
                        self.preempt(inst.instance_id)

    def _trace(self, name: str) -> Trace | None:
        if name not in self._traces:
            root = traces_dir()
            folder, _, file = name.partition("/")
            zone = file.split("_", 1)[0]
            want = [t for t in load_traces(root) if t.zone == zone and t.folder == folder]
            if not want:
                log.warning("sim provider %s: no trace %s under %s", self.name, name, root)
                return None
            self._traces[name] = want[0]
        return self._traces[name]


def _reap(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def threadless_reap(proc: subprocess.Popen) -> None:
    """Wait for it off the event loop, killing it after ``STOP_GRACE_S``."""
    import threading

    threading.Thread(target=_reap, args=(proc, STOP_GRACE_S), daemon=True).start()
