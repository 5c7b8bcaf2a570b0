"""Egress-only networking for containers: a user-mode network stack per container.

Every isolated container has a network namespace of its own. Without ``block_network`` it
gets outbound access through ``slirp4netns`` (Debian's ``slirp4netns``), started for that
namespace by :func:`attach_egress`: a ``tap0`` interface inside (``10.0.2.100/24``, gateway
``10.0.2.2``, DNS forwarder ``10.0.2.3``), whose packets slirp4netns turns into ordinary
sockets of its own on the host. So the container can open connections out, but

- not to the host's loopback: ``--disable-host-loopback`` refuses ``10.0.2.2`` (which would
  otherwise be the host's ``127.0.0.1``), the fence (below) rejects slirp4netns' network
  but the DNS forwarder's port 53 before a packet reaches it (:data:`SLIRP_NETWORK`), and
  ``127.0.0.1`` inside is the container's own;
- not to other containers: each has its own namespace and nothing is forwarded into one
  (no port is published), so a listener in a container is reachable from that container
  only;
- not to the control plane's API except as any outside client would (it listens on the
  host's loopback by default): the channel socket stays its only way in;
- not to the host's own addresses (its other interfaces, where services bound to
  ``0.0.0.0`` listen) nor to link-local ``169.254.0.0/16`` (cloud metadata services):
  :func:`fence` puts an nftables rule in the namespace, as root before the container
  starts, that rejects them (the container has no ``CAP_NET_ADMIN`` to lift it). The host's
  addresses are read when the namespace is made; one added to the host later is not in the
  fences of namespaces made before it (at most a pool's worth).

slirp4netns starts as root, joins the namespace to create ``tap0``, then (``--enable-sandbox``,
``--enable-seccomp``) drops every capability but ``CAP_NET_BIND_SERVICE`` into a mount
namespace of its own with a seccomp filter. It exits when the handle is closed (its exit
pipe closes: also when the worker dies) or, at the latest, when its namespace is gone.

With ``block_network`` nothing is attached: the namespace holds only ``lo``.

A ``cidr_allowlist`` adds a second table (:func:`restrict`, as root, when the runtime takes
the namespace for that container): whatever the container sends that is not for one of
those ranges, its own loopback or the DNS forwarder is rejected (the sender sees an
error at once, never a hang). The fence still applies inside an allowed range: a packet
must pass both tables. Such a container is never forked from a zygote (it starts
normally), and without nftables it does not start at all.

Runtimes take namespaces from an :class:`EgressPool`: made ahead (a holder process and its
slirp4netns), so the few milliseconds they take are off a container's start; the runtime
runs the container's first process in it (``nsenter --net=``). :func:`attach_egress` also
attaches to the namespace of a running process (``pid``), for callers that make their own.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import threading
import time
from functools import cache

from strato import settings
from strato.cidr import parse_allowlist
from strato.exceptions import InvalidError

log = logging.getLogger("strato.runtime")

SLIRP4NETNS = "slirp4netns"
MTU = 65520
TAP = "tap0"
CONTAINER_ADDRESS = "10.0.2.100"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
SLIRP_NETWORK = "10.0.2.0/24"
"""slirp4netns answers every address of its network itself: the gateway and any other as
the host (refused by ``--disable-host-loopback``), the DNS forwarder as the host's resolver
on any port. The refusal is not reliable: libslirp 4.7 sometimes completes the container's
handshake for such a connection without connecting anything on the host (a stale
``errno`` read as "connect in progress"), so a container saw "connected" where nothing
was. The fence rejects the whole network in the namespace instead, but the container's
own address and port 53 of the DNS forwarder: a refusal every time, and no port of the
host's resolver but DNS's."""
ATTACH_TIMEOUT_S = 10.0
_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
_ENV = {"PATH": os.defpath}  # none of the worker's environment (tokens, paths)


class NetworkUnavailable(InvalidError):
    """The user-mode network stack cannot be started."""


@cache
def slirp4netns_path() -> str | None:
    return shutil.which(SLIRP4NETNS)


def egress_unavailable_reason() -> str | None:
    """Why containers here cannot get egress (``None``: they can)."""
    if slirp4netns_path() is None:
        return (
            "slirp4netns is not installed (apt-get install slirp4netns): containers without "
            "block_network=True would have no network"
        )
    return None


class EgressHandle:
    """The user-mode network stack of one container. :meth:`close` stops it (idempotent)."""

    def __init__(self, proc: subprocess.Popen[bytes], exit_fd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._exit_fd: int | None = exit_fd

    def close(self, timeout_s: float = 2.0, wait: bool = True) -> None:
        """Stop slirp4netns (it exits on its exit pipe's EOF); ``wait=False``: reap it in
        the background."""
        if self._exit_fd is not None:
            try:
                os.close(self._exit_fd)
            except OSError:
                pass
            self._exit_fd = None
        _reap(self.proc, timeout_s, wait)

    @property
    def closed(self) -> bool:
        return self._exit_fd is None


def attach_egress(
    pid: int | None = None,
    *,
    netns_path: str | None = None,
    timeout_s: float = ATTACH_TIMEOUT_S,
) -> EgressHandle:
    """Give the network namespace of ``pid`` (or the one at ``netns_path``) outbound access
    through slirp4netns; returns once ``tap0`` is configured in it (a few ms). Blocking:
    call it in a thread from async code. Raises :class:`NetworkUnavailable`."""
    if (pid is None) == (netns_path is None):
        raise ValueError("give exactly one of pid and netns_path")
    exe = slirp4netns_path()
    if exe is None:
        raise NetworkUnavailable(egress_unavailable_reason() or "slirp4netns missing")
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    target = ["--netns-type=path", netns_path] if netns_path is not None else [str(pid)]
    argv = [
        exe,
        "--configure",
        f"--mtu={MTU}",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        f"--ready-fd={ready_w}",
        f"--exit-fd={exit_r}",
        *target,
        TAP,
    ]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(ready_w, exit_r),
            start_new_session=True,
            env=_ENV,
        )
    except OSError as exc:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            os.close(fd)
        raise NetworkUnavailable(f"cannot start slirp4netns: {exc}") from exc
    os.close(ready_w)
    os.close(exit_r)
    handle = EgressHandle(proc, exit_w)
    try:
        deadline = time.monotonic() + timeout_s
        got = b""
        while not got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetworkUnavailable(f"slirp4netns was not ready after {timeout_s:g}s")
            ready, _, _ = select.select([ready_r], [], [], left)
            if ready:
                got = os.read(ready_r, 1)
                if not got:  # it exited before it was ready
                    err = b""
                    if proc.stderr is not None:
                        proc.wait(timeout=timeout_s)
                        err = proc.stderr.read() or b""
                    lines = [x for x in err.decode(errors="replace").splitlines() if x.strip()]
                    why = lines[-1] if lines else f"exit code {proc.returncode}"
                    raise NetworkUnavailable(f"slirp4netns failed: {why}")
    except BaseException:
        handle.close(timeout_s=0.5)
        raise
    finally:
        os.close(ready_r)
    if proc.stderr is not None:  # it logs a line or two; nobody reads them
        proc.stderr.close()
        proc.stderr = None
    try:
        fence(netns_path if netns_path is not None else f"/proc/{pid}/ns/net")
    except BaseException:
        handle.close(timeout_s=0.5)
        raise
    return handle


NFT = "nft"
ALWAYS_FENCED = ("169.254.0.0/16",)
"""Link-local: where clouds serve instance metadata (credentials) at 169.254.169.254."""
_HOST_ADDRESSES_TTL_S = 2.0
_host_addresses_cache: tuple[float, tuple[list[str], list[str]]] | None = None
_warned_no_nft = False


@cache
def nft_path() -> str | None:
    return shutil.which(NFT)


def host_addresses() -> tuple[list[str], list[str]]:
    """The host's own IPv4 and IPv6 addresses, loopback left out (a container's loopback is
    its own), read with iproute2 (cached for a couple of seconds)."""
    global _host_addresses_cache
    now = time.monotonic()
    if _host_addresses_cache and now - _host_addresses_cache[0] < _HOST_ADDRESSES_TTL_S:
        return _host_addresses_cache[1]
    v4: list[str] = []
    v6: list[str] = []
    ip = shutil.which("ip")
    if ip is not None:
        out = subprocess.run(
            [ip, "-j", "addr", "show"], capture_output=True, timeout=5, env=_ENV
        ).stdout
        try:
            links = json.loads(out or b"[]")
        except ValueError:
            links = []
        for link in links:
            for a in link.get("addr_info", []):
                local = a.get("local")
                if not local or a.get("scope") in ("host", "link"):
                    continue  # loopback is the container's own; link-local is fenced whole
                (v6 if a.get("family") == "inet6" else v4).append(local)
    _host_addresses_cache = (now, (v4, v6))
    return v4, v6


def fence_ruleset(v4: list[str], v6: list[str]) -> str:
    """nftables rules for a container's namespace: reject what it sends to ``v4``/``v6``
    (the host's addresses), to link-local ranges, and to slirp4netns' own addresses but
    its DNS forwarder's port 53 (see :data:`SLIRP_NETWORK`)."""
    lines = [
        "table inet strato_fence {",
        "  chain out {",
        "    type filter hook output priority 0; policy accept;",
        f"    ip daddr {{ {', '.join([*ALWAYS_FENCED, *v4])} }} reject with icmpx admin-prohibited",
        f"    ip6 daddr {{ {', '.join(['fe80::/10', *v6])} }} reject with icmpx admin-prohibited",
        f"    ip daddr {DNS} udp dport 53 accept",
        f"    ip daddr {DNS} tcp dport 53 accept",
        f"    ip daddr {SLIRP_NETWORK} ip daddr != {CONTAINER_ADDRESS} reject with icmpx "
        "admin-prohibited",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def fence(netns_path: str) -> None:
    """Reject traffic from the namespace at ``netns_path`` to the host's own addresses and
    to link-local ranges (see the module's docstring). Without nftables installed this says
    so once and leaves the namespace unfenced."""
    global _warned_no_nft
    if nft_path() is None or shutil.which("nsenter") is None:
        if not _warned_no_nft:
            _warned_no_nft = True
            log.warning(
                "nftables is not installed (apt-get install nftables): containers can reach "
                "the host's non-loopback addresses and link-local metadata services"
            )
        return
    _nft(netns_path, fence_ruleset(*host_addresses()), "fence")


def allow_ruleset(v4: list[str], v6: list[str]) -> str:
    """nftables rules for a container's namespace that reject whatever it sends anywhere
    but to ``v4``/``v6``, its own loopback and the DNS forwarder. (The fence's table still
    rejects the host's addresses inside an allowed range: a packet must pass both.)"""
    allow = [
        f"    ip daddr {{ {', '.join(v4)} }} accept" if v4 else "",
        f"    ip6 daddr {{ {', '.join(v6)} }} accept" if v6 else "",
    ]
    lines = [
        "table inet strato_allow {",
        "  chain out {",
        "    type filter hook output priority 1; policy accept;",
        '    oifname "lo" accept',
        f"    ip daddr {DNS} udp dport 53 accept",
        f"    ip daddr {DNS} tcp dport 53 accept",
        *[a for a in allow if a],
        "    reject with icmpx admin-prohibited",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def restrict(netns_path: str, cidrs: list[str]) -> None:
    """Let the namespace at ``netns_path`` reach only ``cidrs`` (see :func:`allow_ruleset`);
    raises :class:`NetworkUnavailable` where nftables is missing (an allowlist that cannot
    be enforced is refused, never ignored). Blocking."""
    _nft(netns_path, allow_ruleset(*parse_allowlist(cidrs)), "restrict")


def _nft(netns_path: str, rules: str, what: str) -> None:
    nft = nft_path()
    nsenter = shutil.which("nsenter")
    if nft is None or nsenter is None:
        raise NetworkUnavailable(
            f"nftables is not installed (apt-get install nftables): cannot {what} the "
            "container's network"
        )
    done = subprocess.run(
        [nsenter, f"--net={netns_path}", nft, "-f", "-"],
        input=rules.encode(),
        capture_output=True,
        timeout=ATTACH_TIMEOUT_S,
        env=_ENV,
    )
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise NetworkUnavailable(f"could not {what} the container's network: {why[-1:]}")


class NetnsHolder:
    """A new, empty network namespace held by a small process (``unshare --net``), for a
    runtime that is given a namespace rather than making one (gVisor). :attr:`path` names it
    while the holder lives; :meth:`close` ends it (idempotent)."""

    def __init__(self) -> None:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise NetworkUnavailable("util-linux's unshare is missing")
        # in its namespace: any port for the container's unprivileged user (as Docker does)
        script = f"echo 0 > {_PORT_START} 2>/dev/null; exec cat"
        self.proc = subprocess.Popen(
            [unshare, "--net", "--", "/bin/sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=_ENV,
        )
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        self.path = f"/proc/{self.proc.pid}/ns/net"
        while True:  # until it has its own namespace (unshare then exec) and set it up
            try:
                if os.readlink(self.path) != mine and _comm(self.proc.pid) == "cat":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise NetworkUnavailable("could not make a network namespace")
            time.sleep(0.0005)

    def close(self, wait: bool = True) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # cat exits on EOF
        _reap(self.proc, 2.0, wait)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _reap(proc: subprocess.Popen[bytes], timeout_s: float, wait: bool) -> None:
    def reap() -> None:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    if wait:
        reap()
    else:
        threading.Thread(target=reap, name="strato-egress-reap", daemon=True).start()


class Egress:
    """A network namespace of its own with egress attached: :attr:`path` names it (for
    ``nsenter --net=``) until :meth:`close`."""

    def __init__(self, holder: NetnsHolder, handle: EgressHandle) -> None:
        self.holder = holder
        self.handle = handle
        self.path = holder.path

    def close(self) -> None:
        """Stop both processes; reaped in the background (closing never waits)."""
        self.handle.close(wait=False)
        self.holder.close(wait=False)


def new_egress() -> Egress:
    """A new namespace with egress (a few ms: two processes started). Blocking."""
    holder = NetnsHolder()
    try:
        return Egress(holder, attach_egress(netns_path=holder.path))
    except BaseException:
        holder.close()
        raise


class EgressPool:
    """Namespaces with egress made ahead of time, so that starting a container does not
    wait for slirp4netns: :meth:`take` hands out a ready one (each is used once) and a
    background thread makes the next. ``$STRATO_EGRESS_POOL`` sets how many wait (0: none,
    each made when asked for)."""

    def __init__(self, size: int | None = None) -> None:
        self.size = settings.EGRESS_POOL.get() if size is None else size
        self._ready: list[Egress] = []
        self._lock = threading.Lock()
        self._filling = False
        self._closed = False
        self._failed: str | None = None

    def start(self) -> None:
        """Begin filling the pool in the background."""
        self._kick()

    def take(self) -> Egress:
        """A ready namespace, else a new one made now. Blocking (call it in a thread from
        async code). Raises :class:`NetworkUnavailable`."""
        with self._lock:
            ready = self._ready.pop() if self._ready else None
        self._kick()
        return ready if ready is not None else new_egress()

    def _kick(self) -> None:
        with self._lock:
            if self._filling or self._closed or self.size <= 0 or self._failed:
                return
            if len(self._ready) >= self.size:
                return
            self._filling = True
        threading.Thread(target=self._fill, name="strato-egress-pool", daemon=True).start()

    def _fill(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self.size:
                        return
                try:
                    made = new_egress()
                except NetworkUnavailable as exc:
                    self._failed = str(exc)  # take() makes them (and raises) from now on
                    return
                with self._lock:
                    if self._closed:
                        made.close()
                        return
                    self._ready.append(made)
        finally:
            with self._lock:
                self._filling = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for e in ready:
            e.close()


_pool: EgressPool | None = None
_pool_lock = threading.Lock()


def default_pool() -> EgressPool:
    """The process's pool (shared by its runtimes), started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = EgressPool()
            _pool.start()
        return _pool


__all__ = [
    "CONTAINER_ADDRESS",
    "DNS",
    "GATEWAY",
    "Egress",
    "EgressHandle",
    "EgressPool",
    "NetnsHolder",
    "NetworkUnavailable",
    "attach_egress",
    "default_pool",
    "egress_unavailable_reason",
    "fence",
    "fence_ruleset",
    "host_addresses",
    "new_egress",
    "restrict",
]
