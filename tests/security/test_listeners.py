"""Listener limits: slowloris and header floods against the control plane's listeners.

The control plane runs the API, the web gateway and the channel in one process. A
dedicated one here gets a small open-file budget (``STRATO_MAX_OPEN_FILES=1200``: 256
reserved, then 472 gateway connections, 188 API connections, 283 channel connections),
an 8 s header read timeout and a 3 s keep-alive timeout, so that the
attacks below are small (a couple of thousand sockets, seconds) and still larger than
the whole process's limit: without the budget, the gateway's connections would take
every file the process has, and the API and the channel would stop answering.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import select
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import dedicated_server, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent))
import web_apps as apps  # noqa: E402

OPEN_FILES = 1200
# listeners.fd_budget of 1200 files: 256 reserved, then 50% / 20% / 30% of the 944 left
GATEWAY_SHARE, API_SHARE = 472, 188
HEADER_TIMEOUT_S = 8  # long enough for an API call and a .remote() during the attack
KEEPALIVE_S = 3
SWEEP_S = 1  # the guards' sweep runs every second (server/listeners.py)
ATTACK_SOCKETS = 1600  # more than the server's whole open-file limit
MAX_HEADER_BYTES = 64 << 10  # the default


@pytest.fixture(scope="module")
def server(strato_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # this process holds the attack's sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= ATTACK_SOCKETS + 200, (
        "the test needs ~1,800 open files (ulimit -n)"
    )
    env = {
        "STRATO_RUNTIME": "process",
        "STRATO_MAX_OPEN_FILES": str(OPEN_FILES),
        "STRATO_HEADER_TIMEOUT": str(HEADER_TIMEOUT_S),
        "STRATO_KEEPALIVE_TIMEOUT": str(KEEPALIVE_S),
    }
    with dedicated_server(env) as handle:
        yield handle
    strato_server.activate()


def ports(server) -> tuple[int, int]:
    """(API port, gateway port)."""
    import json

    info = json.loads((server.home / "server.json").read_text())
    gateway = httpx.URL(info["gateway_url"]).port
    assert gateway is not None
    return info["port"], gateway


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def readable(socks: list[socket.socket], timeout: float = 0) -> set[int]:
    """File numbers of the sockets with something to read (data, EOF or an error)."""
    poller = select.poll()  # (select() stops at file number 1024)
    for s in socks:
        poller.register(s, select.POLLIN)
    return {fd for fd, _ in poller.poll(timeout * 1000)}


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed (or refused) this connection: EOF or reset. Reads
    (and drops) what the server sent before."""
    try:
        while readable([s]):
            if not s.recv(65536):
                return True
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def verdicts(
    socks: list[socket.socket], wait: float
) -> tuple[list[socket.socket], list[socket.socket]]:
    """(refused, held) after ``wait`` s: the server refuses a connection over its limit at
    once (a 503, then EOF, or a reset); one it holds has sent nothing."""
    time.sleep(wait)
    ready = readable(socks)
    refused_: list[socket.socket] = []
    held: list[socket.socket] = []
    for s in socks:
        (refused_ if s.fileno() in ready else held).append(s)
    for s in refused_:
        with contextlib.suppress(OSError):
            data = s.recv(4096)
            assert data == b"" or data.startswith(b"HTTP/1.1 503"), data[:200]
    return refused_, held


def connect_many(port: int, n: int, first: bytes) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(first)
        except OSError:  # refused and reset before the first bytes went out: fine
            pass
        s.setblocking(False)
        out.append(s)
    return out


def status_of(port: int, head: bytes) -> int | None:
    """Send a raw head, return the response's status (None: closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head)
            data = s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return None
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


# ---------------------------------------------------------------------- slowloris


@pytest.mark.slow
def test_slowloris_on_the_gateway_leaves_the_api_and_channel_up(server):
    api_port, gw_port = ports(server)
    pid = server.pid
    # every socket sends a request line and one header, then trickles a byte at a time
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-a: "
    attack = connect_many(gw_port, ATTACK_SOCKETS, head)
    try:
        refused_, held = verdicts(attack, 1.0)
        # the server holds at most its gateway share, and refuses the rest at once
        assert len(held) <= GATEWAY_SHARE, (
            f"the gateway holds {len(held)} connections, over its share ({GATEWAY_SHARE})"
        )
        assert len(refused_) >= ATTACK_SOCKETS - GATEWAY_SHARE
        assert open_fds(pid) < OPEN_FILES, "the control plane is at its open-file limit"
        # and a newcomer is refused too while the gateway is full. (On a loaded machine
        # opening the attack can outlast the header timeout: the server has closed the
        # first connections it held by now, and has room. Fill its share again first.)
        if len(held) < GATEWAY_SHARE:
            extra = connect_many(gw_port, GATEWAY_SHARE - len(held) + 20, head)
            attack += extra
            held += verdicts(extra, 0.5)[1]
        assert status_of(gw_port, b"GET /__strato/health HTTP/1.1\r\n\r\n") == 503
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.3):
                for s in held:
                    with contextlib.suppress(OSError):
                        s.send(b"a")

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            # while the attack holds the gateway's share: the API answers, and a new
            # container (which dials the channel) runs a call
            assert httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=30).status_code == 200
            with apps.pinger.run(quiet=True):
                assert apps.ping.remote(41) == 42
            still = sum(1 for s in held if not closed_by_server(s))
            assert still > 0, (
                "the attack's connections were all gone before the API call and the "
                f".remote() finished (they took over the {HEADER_TIMEOUT_S}s header "
                "timeout): this run could not show that they answer during the attack"
            )
            # connections that never finish their head are closed by the server, however
            # they trickle (the deadline is from the connection's start)
            wait_until(
                lambda: all(closed_by_server(s) for s in held),
                HEADER_TIMEOUT_S + SWEEP_S + 20,
                "the server to close every slowloris connection (header read timeout "
                f"{HEADER_TIMEOUT_S}s, swept every {SWEEP_S}s)",
                every=0.5,
            )
        finally:
            stop.set()
            t.join(10)
    finally:
        for s in attack:
            s.close()
    # the gateway serves again
    assert status_of(gw_port, b"GET /__strato/health HTTP/1.1\r\nHost: x\r\n\r\n") == 200


def test_connections_over_the_api_limit_are_refused(server):
    api_port, _ = ports(server)
    n = 300  # the API's share here is 188 connections
    held = connect_many(api_port, n, b"")
    try:
        refused_, kept = verdicts(held, 1.0)
        assert len(kept) <= API_SHARE, f"the API holds {len(kept)} connections, over {API_SHARE}"
        assert len(refused_) >= n - API_SHARE
        assert len(kept) >= API_SHARE - 20, "the API refused connections under its limit"
    finally:
        for s in held:
            s.close()
    assert httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=30).status_code == 200


# ---------------------------------------------------------------------- header floods


@pytest.mark.parametrize("listener", ["gateway", "api"])
def test_header_limits_are_431(server, listener):
    api_port, gw_port = ports(server)
    port = gw_port if listener == "gateway" else api_port
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n"
    assert status_of(port, huge) == 431
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    assert status_of(port, many + b"\r\n") == 431
    # at the limits is fine (the gateway's 404: no app at /; the API's own 404 or 401)
    ok = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(90))
    assert status_of(port, ok + b"\r\n") not in (None, 431)


def test_header_floods_leave_rss_bounded(server):
    """Eight connections each try to send 32 MiB of one header, to both listeners. Each
    is cut off after the head limit (64 KiB), so the server holds at most that plus a
    read buffer per connection: RSS grows by a few MiB at most. Unlimited, it would
    buffer all 512 MiB (and keep much of it). The bound, 96 MiB, leaves room for the
    allocator and for a container or two starting meanwhile."""
    api_port, gw_port = ports(server)
    pid = server.pid
    before = rss_kib(pid)
    sent: list[int] = []
    lock = threading.Lock()

    def flood(port: int) -> None:
        total = 0
        chunk = b"a" * (64 << 10)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                while total < 32 << 20:
                    s.sendall(chunk)
                    total += len(chunk)
            except OSError as e:
                assert e.errno in (errno.ECONNRESET, errno.EPIPE) or isinstance(
                    e, (ConnectionError, TimeoutError)
                ), e
        with lock:
            sent.append(total)

    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=flood, args=(p,)) for p in [gw_port, api_port] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    sampler.join(5)
    after = rss_kib(pid)
    assert len(sent) == len(threads)
    # each flood was cut off long before its 32 MiB (the kernel's socket buffers take
    # a few MiB before the close is seen)
    assert max(sent) < 16 << 20, f"a flood sent {max(sent)} bytes before being cut off"
    grew = (max(peak[0], after) - before) // 1024
    assert grew < 96, f"the control plane's RSS grew by {grew} MiB under header floods"


# ---------------------------------------------------------------------- keep-alive


@pytest.mark.slow
def test_idle_and_silent_connections_are_closed(server):
    api_port, gw_port = ports(server)
    targets = [(gw_port, b"/__strato/health"), (api_port, b"/health")]
    conns = []
    for port, path in targets:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.setblocking(False)
        conns.append(s)
    try:
        # keep-alive connections, idle: the server closes them after the keep-alive timeout
        wait_until(
            lambda: all(closed_by_server(s) for s in conns),
            KEEPALIVE_S + SWEEP_S + 20,
            f"the server to close idle keep-alive connections (timeout {KEEPALIVE_S}s)",
            every=0.2,
        )
    finally:
        for s in conns:
            s.close()
    # connections that never send anything are closed too (the header read timeout)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for port, _ in targets]
    try:
        assert not any(closed_by_server(s) for s in silent)
        wait_until(
            lambda: all(closed_by_server(s) for s in silent),
            HEADER_TIMEOUT_S + SWEEP_S + 20,
            f"the server to close silent connections (header timeout {HEADER_TIMEOUT_S}s)",
            every=0.2,
        )
    finally:
        for s in silent:
            s.close()
