"""The ``local`` provider: this machine as one node, served by one worker agent process.

The agent is a child of the control plane and exits when its parent does (it watches its
parent's pid), so a restarted control plane never finds two agents for one node.

The provider supervises its agent: when it dies (a crash, SIGKILL, the OOM killer) the
containers it left behind are killed (under bwrap they die with it; under the ``process``
runtime they are plain processes of their own session) and a new agent is started after a
backoff that doubles from ``STRATO_WORKER_RESTART_BACKOFF`` (``first,cap`` seconds, default
``0.5,30``) and resets once an agent has stayed up ``STRATO_WORKER_RESTART_RESET_S`` (60 s).
The new agent registers as the same node. Each restart is recorded as one JSON line in
``$STRATO_HOME/logs/worker-restarts.jsonl`` (exit status, planned delay, pids).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from strato import settings

from .base import Capabilities, Instance, Offer, ProvisionError

log = logging.getLogger("strato.providers.local")

POLL_S = 0.25


@dataclass
class Restart:
    """One restart of the worker agent, as recorded in ``worker-restarts.jsonl``."""

    attempt: int  # restarts since the last reset (1 = first)
    total: int  # restarts since the control plane started
    died_pid: int
    exit_code: int | None
    signal: int | None
    uptime_s: float
    delay_s: float  # the planned backoff before the new agent was started
    orphans_killed: int
    ts: float
    new_pid: int | None = None


class Backoff:
    """Exponential restart delays, capped, reset after a long enough uptime."""

    def __init__(self, first: float, cap: float, reset_after: float) -> None:
        self.first, self.cap, self.reset_after = first, cap, reset_after
        self.attempt = 0

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.reset_after:
            self.attempt = 0
        self.attempt += 1
        return min(self.first * 2 ** (self.attempt - 1), self.cap)


def container_orphans(channel: str) -> list[int]:
    """Pids of this user's processes that are containers dialling ``channel`` (their
    environment says ``STRATO_CHANNEL=<channel>``) and lead their own process group."""
    needle = b"STRATO_CHANNEL=" + channel.encode()
    me = os.getuid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{entry}").st_uid != me:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(pid)
    return found


def kill_orphans(channel: str) -> int:
    """SIGKILL the process groups of containers a dead agent left behind (the ``process``
    runtime starts each in its own session; under bwrap they are gone already)."""
    pids = container_orphans(channel)
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            if pgid == pid:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    return len(pids)


class LocalProvider:
    """This machine, one fixed node: behind the ``Provider`` interface (``base.py``) it
    sells nothing and provisions nothing; its one instance is its agent."""

    name = "local"
    capabilities = Capabilities(provisions=False, spot=False)

    def __init__(
        self,
        home: Path,
        channel: str,
        token: str,
        *,
        on_restart: Callable[[Restart], None] | None = None,
    ) -> None:
        self.home = home
        self.channel = channel
        self.token = token
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.backoff = Backoff(
            *settings.WORKER_RESTART_BACKOFF.get(), settings.WORKER_RESTART_RESET_S.get()
        )
        self.restarts: list[Restart] = []
        self.on_restart = on_restart
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    @property
    def restart_log(self) -> Path:
        return self.home / "logs" / "worker-restarts.jsonl"

    def start_worker(self) -> None:
        env = dict(os.environ)
        env.update(
            STRATO_HOME=str(self.home),
            STRATO_WORKER_CHANNEL=self.channel,
            STRATO_TOKEN=self.token,
            STRATO_WORKER_PARENT_PID=str(os.getpid()),
            STRATO_NODE_PROVIDER=self.name,
        )
        path = self.home / "logs" / "worker.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "strato.worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # the control plane's files are 0600 (umask 077); what the agent writes
                # (code, specs, image layers) containers read: it sits in 0700 folders
                umask=0o022,
            )
        finally:
            os.close(fd)
        self.started_at = time.monotonic()

    def supervise(self) -> asyncio.Task:
        """Restart the agent whenever it dies, until ``stop_worker``; call from the loop."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="worker-supervisor")
        return self._supervisor

    async def _supervise(self) -> None:
        while not self._stopping:
            proc = self.proc
            if proc is None:
                return
            while proc.poll() is None:
                await asyncio.sleep(POLL_S)
                if self._stopping:
                    return
            uptime = time.monotonic() - self.started_at
            rc = proc.returncode
            orphans = await asyncio.to_thread(kill_orphans, self.channel)
            delay = self.backoff.next_delay(uptime)
            r = Restart(
                attempt=self.backoff.attempt,
                total=len(self.restarts) + 1,
                died_pid=proc.pid,
                exit_code=rc if rc >= 0 else None,
                signal=-rc if rc < 0 else None,
                uptime_s=round(uptime, 3),
                delay_s=delay,
                orphans_killed=orphans,
                ts=time.time(),
            )
            how = f"signal {r.signal}" if r.signal else f"exit code {r.exit_code}"
            log.warning(
                "the worker agent (pid %s) died (%s) after %.1fs; %d container process(es) "
                "it left killed; restarting it in %.1fs (restart %d)",
                proc.pid,
                how,
                uptime,
                orphans,
                delay,
                r.total,
            )
            if self.on_restart is not None:
                try:
                    self.on_restart(r)
                except Exception:  # noqa: BLE001 - a report must not stop supervision
                    log.exception("worker restart report failed")
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                self.start_worker()
            except OSError:
                log.exception("could not start the worker agent; trying again")
                self.proc = proc  # dead: the loop goes round with a longer delay
                self.started_at = time.monotonic()
                continue
            r.new_pid = self.proc.pid if self.proc is not None else None
            self.restarts.append(r)
            self._record(r)

    def _record(self, r: Restart) -> None:
        try:
            fd = os.open(self.restart_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps(asdict(r)) + "\n")
        except OSError:
            log.exception("could not record the worker restart")

    # --- the Provider interface

    def offers(self) -> list[Offer]:
        return []

    def provision(self, offer: Offer, *, spot: bool) -> Instance:
        raise ProvisionError("the local provider has one fixed node: this machine")

    def terminate(self, instance_id: str, reason: str = "released") -> None:
        """Its node is this machine: never given back (``stop_worker`` stops its agent)."""

    def instances(self) -> list[Instance]:
        return []

    def close(self) -> None:
        self.stop_worker()

    def stop_worker(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
