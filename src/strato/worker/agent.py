"""The worker agent: one per node.

It dials the control plane's channel, registers its node's resources, starts containers
through a ``Runtime`` when asked, ships their stdout/stderr line by line (tagged with the
container id, batched), and reports each exit with its cause (code, signal, out of
memory). When the control plane goes away it keeps dialling; a local agent (started by the
control plane) exits with its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import time
from pathlib import Path

import msgspec

from strato import settings
from strato.client.config import strato_home
from strato.client.http import ApiBase, ApiClient
from strato.client.local_channel import LocalChannelClient
from strato.protocol import frames
from strato.protocol import messages as m
from strato.runtime import get_runtime
from strato.runtime.base import ContainerLaunch, RunningContainer, Runtime

from . import snapshots, volumes
from .coldstart import ZygotePool
from .launch import compile_strato, prepare_launch
from .lines import REDRAW, LineSplitter
from .relay import Relay
from .resources import NodeInventory, detect_inventory

log = logging.getLogger("strato.worker")

LOG_FLUSH_S = 0.02
LOG_QUOTA_WINDOW_S = 60.0
# the control plane counts the node lost after STRATO_WORKER_HEARTBEAT_TIMEOUT (30 s)
# without one
MAX_LOG_LINE = 16 << 10
LOG_READ = 64 << 10
PARTIAL_LINE_S = 0.5  # how long a line without its end waits before it is shown
_CONTAINER_ID = re.compile(r"ct-[0-9a-f]{1,64}")


def log_quota_from_env() -> int:
    """``STRATO_LOG_QUOTA``: bytes of log lines a container may write per minute (a line
    counts its UTF-8 bytes plus its newline); 0 means no limit."""
    return max(0, settings.LOG_QUOTA.get())


class LogQuota:
    """Per container, per minute: lines past ``quota`` bytes are dropped, and the app's
    log says so when dropping starts and, when the minute ends (or the container does),
    how much was dropped."""

    def __init__(self, quota: int, window_s: float = LOG_QUOTA_WINDOW_S) -> None:
        self.quota = quota
        self.window_s = window_s
        # container id -> [window start, bytes used, bytes dropped, lines dropped]
        self._windows: dict[str, list] = {}

    def admit(self, cid: str, text: str, now: float) -> tuple[bool, list[str]]:
        """(keep the line, notices to log first)."""
        if not self.quota:
            return True, []
        notices: list[str] = []
        w = self._windows.get(cid)
        if w is None or now - w[0] >= self.window_s:
            if w is not None and (summary := self._summary(w)):
                notices.append(summary)
            w = self._windows[cid] = [now, 0, 0, 0]
        size = len(text.encode("utf-8", "replace")) + 1
        if w[1] + size <= self.quota:
            w[1] += size
            return True, notices
        if not w[3]:
            notices.append(
                f"over the log quota of {self.quota} bytes per minute (STRATO_LOG_QUOTA): "
                "this container's output is dropped until the minute ends"
            )
        w[2] += size
        w[3] += 1
        return False, notices

    def window_end(self, cid: str) -> float | None:
        w = self._windows.get(cid)
        return None if w is None else w[0] + self.window_s

    def close(self, cid: str, *, forget: bool) -> str | None:
        """The summary of what was dropped so far (None: nothing was)."""
        w = self._windows.pop(cid, None) if forget else self._windows.get(cid)
        return None if w is None else self._summary(w)

    def _summary(self, w: list) -> str | None:
        if not w[3]:
            return None
        text = (
            f"{w[2]} bytes of logs dropped ({w[3]} lines): over the quota of "
            f"{self.quota} bytes per minute"
        )
        w[2] = w[3] = 0
        return text


class WorkerAgent:
    def __init__(
        self,
        channel: str,
        token: str,
        home: Path,
        *,
        name: str | None = None,
        provider: str = "local",
        parent_pid: int | None = None,
        server_url: str | None = None,
        tls: ssl.SSLContext | None = None,
        labels: dict[str, str] | None = None,
        inventory: NodeInventory | None = None,
    ) -> None:
        self.channel = channel
        # --- ray: what this node offers, as its provider declares it (None: detected)
        self.inventory = inventory
        # --- cluster: an agent that joined over the network (``strato worker start``)
        # fetches code and blobs from ``server_url`` and relays its containers' channels
        self.server_url = server_url
        self.tls = tls
        self.labels = labels or {}
        self.relay: Relay | None = None
        if server_url is not None:
            self.relay = Relay(home / "run" / "relay.sock")
        self.token = token
        self.home = home
        self.cache = home / "worker"
        self.name = name or socket.gethostname()
        self.provider = provider
        self.parent_pid = parent_pid
        self.worker_id = "wk-" + secrets.token_hex(6)
        self.runtime = get_runtime(settings.RUNTIME.get() or None)
        self._hide_home(self.runtime)
        self.default_runtime = self.runtime.name
        self.runtimes: dict[str, Runtime] = {self.runtime.name: self.runtime}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.containers: dict[str, RunningContainer] = {}
        self.starting: set[str] = set()
        self.killed: set[str] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._log_buf: list[m.LogLine] = []
        self._log_flush: asyncio.TimerHandle | None = None
        self._outbox: list[object] = []  # what could not be sent while disconnected
        self._http: ApiBase | None = None
        self._stop = asyncio.Event()
        self.log_quota = LogQuota(log_quota_from_env())
        # cold starts: containers forked from zygotes and memory-snapshot templates
        self.zygotes = ZygotePool(
            self.cache,
            tell=lambda cid, text: self._add_log(m.LogLine(time.time(), cid, "system", text)),
            output=lambda cid, stream, text: self._output(cid, stream, text[:MAX_LOG_LINE]),
        )

    # ------------------------------------------------------------------ connection

    def send(self, msg: object) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frames.encode(msg))
        elif not isinstance(msg, (m.Logs, m.RelayOpen, m.RelayData, m.RelayClose)):
            self._outbox.append(msg)  # (a relayed stream ends with its session: not kept)

    def _sweep_leftovers(self) -> None:
        """Volume overlays an earlier agent on this cache left mounted (it was killed):
        unmounted, but only while this agent holds the cache's lock, so that an agent still
        running on the same cache keeps its containers' mounts."""
        self._cache_lock = open(self.cache / "agent.lock", "a+b")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._cache_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("another agent uses %s: leaving its volume mounts alone", self.cache)
            return
        volumes.sweep_leftovers(self.cache)

    def _private_dirs(self) -> None:
        """This node's cache and (under STRATO_HOME) image cache: folders only this user
        enters (their files keep the modes containers need to read them)."""
        dirs = [self.cache]
        if settings.IMAGE_CACHE.get() is None:
            dirs.append(self.home / "images")
        for d in dirs:
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
            except OSError as e:
                log.warning("could not make %s private: %s", d, e)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._private_dirs()
        self._sweep_leftovers()
        self._loop.run_in_executor(None, compile_strato, True)  # (for containers; once)
        inv = self.inventory or detect_inventory()
        node = m.NodeInfo(
            name=self.name,
            provider=self.provider,
            cpu=inv.cpu,
            memory_mb=inv.memory_mb,
            gpus=inv.gpus,
            region=inv.region,
            price_per_hour=inv.price_per_hour,
            labels={**inv.labels, **self.labels},
        )
        log.info(
            "worker %s: %s CPU, %s MiB, GPUs %s, runtime %s",
            self.worker_id,
            node.cpu,
            node.memory_mb,
            node.gpus or "none",
            self.runtime.describe(),
        )
        watch = asyncio.create_task(self._watch_parent())
        if self.relay is not None:
            await self.relay.start()
        delay = 0.1
        try:
            while not self._stop.is_set():
                if self.parent_pid and os.getppid() != self.parent_pid:
                    # never dial a control plane that restarted in our parent's place: it
                    # starts its own agent for this node
                    log.info("the control plane (pid %s) exited; stopping", self.parent_pid)
                    break
                try:
                    await self._session(node)
                    delay = 0.1
                except (OSError, frames.FrameError, asyncio.IncompleteReadError) as e:
                    log.info("channel to the control plane unavailable (%s); retrying", e)
                if self._stop.is_set():
                    break
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 2.0)
        finally:
            watch.cancel()
            if self.relay is not None:
                self.relay.close()
            await self.shutdown()

    async def _session(self, node: m.NodeInfo) -> None:
        family, addr = frames.parse_address(self.channel)
        if family == "unix":
            assert isinstance(addr, str)
            reader, writer = await asyncio.open_unix_connection(addr, limit=1 << 20)
        else:
            assert isinstance(addr, tuple)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*addr, limit=1 << 20, ssl=self.tls), 10.0
            )
            sock = writer.get_extra_info("socket")
            if sock is not None:  # a cut link shows within a minute, not TCP's 15
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
        writer.write(
            frames.encode(m.WorkerHello(self.token, node, self.worker_id, list(self.containers)))
        )
        welcome = await asyncio.wait_for(frames.read_frame(reader), 10.0)
        if not isinstance(welcome, m.WorkerWelcome):
            writer.close()
            raise frames.FrameError("the control plane refused this worker (bad token?)")
        if self._stop.is_set():  # told to stop while registering: never stay registered
            writer.close()
            return
        self._writer = writer
        if self._http is not None:
            self._http.close()  # (the earlier session's)
        self._http = self._api_client(family, addr, welcome)
        if self.relay is not None:  # --- cluster
            self.relay.attach(self.send, writer.drain)
        log.info("registered as %s with control plane epoch %s", welcome.node_id, welcome.epoch)
        self.zygotes.prewarm(self.runtime, self.container_channel)
        for cid in welcome.kill:
            if cid in self.containers or cid in self.starting:
                self._kill(cid, 0.0)
            else:  # one of an earlier agent of this node: what is left of it goes
                asyncio.create_task(asyncio.to_thread(self._clean_stale, cid))
        outbox, self._outbox = self._outbox, []
        for msg in outbox:
            self.send(msg)
        beat = asyncio.create_task(self._heartbeat(writer))
        try:
            while (msg := await frames.read_frame(reader)) is not None:
                if isinstance(msg, m.ContainerStart):
                    self.starting.add(msg.container_id)  # a kill right behind it finds it
                    asyncio.create_task(self._start(msg))
                elif isinstance(msg, m.ContainerKill):
                    self._kill(msg.container_id, msg.grace_s)
                elif isinstance(msg, (m.RelayData, m.RelayClose)):  # --- cluster
                    if self.relay is not None:
                        self.relay.on_frame(msg)
                elif isinstance(msg, m.SbOomQuery):  # --- sandboxes
                    rc = self.containers.get(msg.container_id)
                    count = oom_kills(getattr(rc, "cgroup", None))
                    self.send(m.SbOomCount(msg.container_id, count))
                elif isinstance(msg, m.SbSnapshot) and self._http is not None:
                    rc = self.containers.get(msg.container_id)  # its writable layer, a blob
                    snapshots.take(msg, rc, self.cache / "snapshots", self._http, self.send)
        finally:
            beat.cancel()
            self._writer = None
            if self.relay is not None:
                self.relay.detach()
            writer.close()

    def _api_client(self, family: str, addr: object, welcome: m.WorkerWelcome) -> ApiBase:
        """What this agent fetches code, blobs and volumes with: on the control plane's
        machine its channel socket (as a local client: no TLS to configure); a joined
        agent the HTTP(S) API with its node's credential, verifying a certificate against
        its ``--tls-ca`` (else the system's CAs)."""
        if family == "unix" and self.server_url is None:
            assert isinstance(addr, str)
            return LocalChannelClient(welcome.http_url, self.token, addr)
        url = self.server_url or welcome.http_url
        context = self.tls if url.startswith("https:") else None
        return ApiClient(url, welcome.api_token or self.token, tls_context=context)

    async def _heartbeat(self, writer: asyncio.StreamWriter) -> None:
        while not writer.is_closing():
            writer.write(frames.encode(m.Heartbeat(running=list(self.containers))))
            await asyncio.sleep(settings.WORKER_HEARTBEAT_S.get())

    async def _watch_parent(self) -> None:
        if not self.parent_pid:
            return
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != self.parent_pid:
                log.info("the control plane (pid %s) exited; stopping", self.parent_pid)
                self._stop.set()
                if self._writer is not None:
                    self._writer.close()
                return

    # ------------------------------------------------------------------ containers

    @property
    def container_channel(self) -> str:
        """The channel address containers of this node dial (a joined node's: its relay)."""
        return self.relay.address if self.relay is not None else self.channel

    async def _start(self, msg: m.ContainerStart) -> None:
        cid = msg.container_id
        if self.relay is not None:  # --- cluster: they dial this agent's relay
            msg = msgspec.structs.replace(msg, channel=self.relay.address)
        self.starting.add(cid)
        try:
            runtime = self._runtime(msg.spec.runtime or msg.runtime)
            launch = await asyncio.to_thread(self._prepare, msg, runtime)
            if cid in self.killed:  # killed while its image or code was being prepared
                self.killed.discard(cid)
                self.send(m.ContainerExited(cid, None, None, False, "killed before it started"))
                volumes.finish(self.cache, cid, None, commit=False)
                return
            rc = await self.zygotes.start(msg, launch, runtime)  # forked; None: start normally
            if rc is None:
                rc = await runtime.start(launch)
        except Exception as e:  # noqa: BLE001 - reported to the control plane
            log.exception("container %s failed to start", cid)
            name = (
                type(e).__name__
                if type(e).__module__.startswith("strato")
                else ("ContainerStartError")
            )
            self.send(m.ContainerStartFailed(cid, str(e), error_type=name))
            volumes.finish(self.cache, cid, None, commit=False)
            return
        finally:
            self.starting.discard(cid)
        self.containers[cid] = rc
        self.send(m.ContainerStarted(cid, rc.pid))
        if cid in self.killed:
            rc.signal(signal.SIGKILL)
        pumps = [
            asyncio.create_task(self._pump_logs(cid, rc.stdout, "stdout")),
            asyncio.create_task(self._pump_logs(cid, rc.stderr, "stderr")),
        ]
        status = await rc.wait()
        await asyncio.wait(pumps, timeout=2.0)
        dropped = self.log_quota.close(cid, forget=True)
        if dropped:
            self._add_log(m.LogLine(time.time(), cid, "system", dropped))
        self._flush_logs()
        self.containers.pop(cid, None)
        self.killed.discard(cid)
        # --- volumes: what it changed and did not commit is committed at its exit
        for line in await asyncio.to_thread(volumes.finish, self.cache, cid, self._http):
            self._add_log(m.LogLine(time.time(), cid, "system", line))
        self._flush_logs()
        self.send(
            m.ContainerExited(
                cid, status.exit_code, status.signal, status.oom_killed, status.description
            )
        )

    def _prepare(self, msg: m.ContainerStart, runtime: Runtime) -> ContainerLaunch:
        loop, http = self._loop, self._http
        assert loop is not None and http is not None  # (a session is open)

        def build_log(line: str) -> None:  # image build output, from this worker thread
            entry = m.LogLine(time.time(), msg.container_id, "system", line)
            loop.call_soon_threadsafe(self._add_log, entry)

        launch = prepare_launch(
            msg,
            cache=self.cache,
            isolated=runtime.capabilities.isolation,
            fetch_blob=http.get_blob,
            log=build_log,
        )
        isolated = runtime.capabilities.isolation  # --- volumes: mounted from the cache
        return volumes.add_to_launch(self.cache, msg, launch, isolated, http)

    def _runtime(self, name: str | None) -> Runtime:
        name = name or self.default_runtime
        rt = self.runtimes.get(name)
        if rt is None:
            rt = self.runtimes[name] = self._hide_home(get_runtime(name))
        return rt

    def _hide_home(self, runtime: Runtime) -> Runtime:
        """Containers without an image see the host root read-only: hide this worker's
        home (other containers' specs and tokens, the channel) from them."""
        runtime.hide(str(self.home))
        return runtime

    def _clean_stale(self, cid: str) -> None:
        """Kill the processes left in the cgroup of a container an earlier agent of this
        node started (the control plane counts it dead), and remove the cgroup."""
        if not _CONTAINER_ID.fullmatch(cid):
            return
        for rt in list(self.runtimes.values()):
            group = rt.cgroups.leftover(cid) if rt.cgroups is not None else None
            if group is None:
                continue
            log.info("removing what is left of container %s of an earlier agent", cid)
            group.kill_all()
            group.remove()

    def _kill(self, cid: str, grace_s: float) -> None:
        rc = self.containers.get(cid)
        if rc is None:
            if cid in self.starting:
                self.killed.add(cid)  # _start reports its end
            else:  # never started here (or long gone): say so, or its record waits forever
                self.send(m.ContainerExited(cid, None, None, False, "not running on its node"))
            return
        self.killed.add(cid)
        if grace_s > 0:
            asyncio.create_task(rc.stop(grace_s))
        else:
            rc.signal(signal.SIGKILL)

    async def _pump_logs(self, cid: str, stream: asyncio.StreamReader, name: m.LogStream) -> None:
        """Ship what the container writes, line by line; a progress bar's ``\r`` redraws
        and a partial line that waits ``PARTIAL_LINE_S`` go out at once (see ``lines``)."""
        splitter = LineSplitter(MAX_LOG_LINE)
        while True:
            wait = PARTIAL_LINE_S if splitter.pending and not splitter.partial_shown else None
            try:
                data = await asyncio.wait_for(stream.read(LOG_READ), wait)
            except TimeoutError:
                partial = splitter.partial()
                if partial is not None:
                    self._output(cid, name, partial)
                continue
            if not data:
                for text in splitter.close():
                    self._output(cid, name, text)
                return
            for text in splitter.feed(data):
                self._output(cid, name, text)

    def _output(self, cid: str, stream: m.LogStream, text: str) -> None:
        """A line a container wrote: shipped within its log quota."""
        now = time.monotonic()
        keep, notices = self.log_quota.admit(cid, text, now)
        for notice in notices:
            self._add_log(m.LogLine(time.time(), cid, "system", notice))
            if notice.startswith("over the log quota"):  # say how much at the minute's end
                end = self.log_quota.window_end(cid) or now
                asyncio.get_running_loop().call_later(
                    max(0.0, end - now), self._quota_window_ended, cid, end
                )
        if keep:
            self._add_log(m.LogLine(time.time(), cid, stream, text))

    def _quota_window_ended(self, cid: str, end: float) -> None:
        if self.log_quota.window_end(cid) != end:
            return  # the container ended, or a later line opened a new minute already
        dropped = self.log_quota.close(cid, forget=False)
        if dropped:
            self._add_log(m.LogLine(time.time(), cid, "system", dropped))

    def _add_log(self, line: m.LogLine) -> None:
        buf = self._log_buf
        if line.text.endswith(REDRAW) and buf:
            last = buf[-1]
            if (
                last.container_id == line.container_id
                and last.stream == line.stream
                and last.text.endswith(REDRAW)
            ):  # a progress bar redrawn before its last state went out: only the newest
                buf[-1] = line
                return
        buf.append(line)
        if len(self._log_buf) >= 500:
            self._flush_logs()
        elif self._log_flush is None:
            self._log_flush = asyncio.get_running_loop().call_later(LOG_FLUSH_S, self._flush_logs)

    def _flush_logs(self) -> None:
        if self._log_flush is not None:
            self._log_flush.cancel()
            self._log_flush = None
        if self._log_buf:
            lines, self._log_buf = self._log_buf, []
            self.send(m.Logs(lines))

    async def shutdown(self, grace_s: float = 5.0) -> None:
        running = list(self.containers.values())
        if running:
            await asyncio.gather(*(rc.stop(grace_s) for rc in running), return_exceptions=True)
        await self.zygotes.close()

    def request_stop(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.close()


def main() -> None:
    logging.basicConfig(
        level=settings.LOG_LEVEL.get(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    home = strato_home()
    channel = settings.WORKER_CHANNEL.get() or f"unix:{home / 'run' / 'channel.sock'}"
    token = settings.TOKEN.get() or (home / "token").read_text().strip()
    agent = WorkerAgent(
        channel,
        token,
        home,
        name=settings.NODE_NAME.get() or None,
        provider=settings.NODE_PROVIDER.get(),
        parent_pid=settings.WORKER_PARENT_PID.get(),
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run()

    asyncio.run(run())


def oom_kills(cgroup: object) -> int:
    """--- sandboxes: how many processes the OOM killer has killed in a container's cgroup
    (``oom_kill`` of cgroup v2's ``memory.events`` or v1's ``memory.oom_control``)."""
    if cgroup is None:
        return 0
    version, dirs = getattr(cgroup, "version", 0), getattr(cgroup, "dirs", {})
    if version == 2:
        path = Path(getattr(cgroup, "path", "")) / "memory.events"
    elif "memory" in dirs:
        path = Path(dirs["memory"]) / "memory.oom_control"
    else:
        return 0
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
