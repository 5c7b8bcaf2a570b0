"""Limits of sandboxes, each a case under every runtime offered for sandboxes (bwrap and
gVisor): a disk fill stops at ``ephemeral_disk`` with ENOSPC inside and leaves the host's
disk alone; a CPU hog on every core leaves a neighbour its share; ``cidr_allowlist``
lets a sandbox reach only the listed ranges (addresses in a network namespace this test
makes, never outside ones); bad ranges are refused with a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
import limits_apps as apps  # noqa: E402

pytestmark = pytest.mark.slow

if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("runsc"):
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")

RUNTIMES = ["bwrap", "gvisor"]
DISK_MB = 32


@pytest.fixture(scope="module")
def cluster(strato_server):
    cache = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
    with dedicated_server({"STRATO_IMAGE_CACHE": cache}) as handle:
        app = strato.App.lookup(f"limits-{uuid.uuid4().hex[:8]}", create_if_missing=True)
        yield handle, app


@pytest.fixture(params=RUNTIMES)
def runtime(request):
    return request.param


@pytest.fixture
def make(cluster, runtime):
    made: list[strato.Sandbox] = []

    def make_one(**kw) -> strato.Sandbox:
        sb = strato.Sandbox.create(app=cluster[1], runtime=runtime, timeout=180, **kw)
        made.append(sb)
        return sb

    yield make_one
    for sb in made:
        sb.terminate()


def run(sb: strato.Sandbox, *cmd: str, timeout: float = 90) -> tuple[int, str, str]:
    p = sb.exec(*cmd, timeout=timeout)
    return p.wait(), p.stdout.read(), p.stderr.read()


def py(sb: strato.Sandbox, code: str, timeout: float = 90) -> tuple[int, str, str]:
    return run(sb, "python3", "-c", code, timeout=timeout)


# --------------------------------------------------------------------------- disk fill

FILL = """
import errno, os, sys
path = sys.argv[1]
written = 0
block = b"x" * (1 << 20)
try:
    with open(path, "wb") as f:
        while written < (1 << 30):
            f.write(block)
            f.flush()
            written += len(block)
    print("no limit", written)
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), written >> 20)
"""


@pytest.mark.parametrize("folder", ["/tmp", "/root", "/dev/shm"])
def test_disk_fill_stops_at_the_limit(make, folder):
    sb = make(ephemeral_disk=DISK_MB)
    host = shutil.disk_usage("/")
    code, out, err = run(sb, "python3", "-c", FILL, f"{folder}/fill")
    assert code == 0, err
    kind, mib = out.split()
    assert kind == "ENOSPC", f"filling {folder}: {out!r} {err!r}"
    assert DISK_MB - 4 <= int(mib) <= DISK_MB, out
    # the host's disk took none of it (tmpfs); other writers on this machine may move
    # its free space by a little meanwhile, never by the 1 GiB the fill tried
    assert abs(shutil.disk_usage("/").free - host.free) < 512 << 20
    # the sandbox carries on: its files can be removed and written again
    assert run(sb, "rm", f"{folder}/fill")[0] == 0
    assert run(sb, "sh", "-c", f"echo again > {folder}/small && cat {folder}/small")[1] == (
        "again\n"
    )


def test_disk_fill_of_an_images_writable_layer_stops_at_the_limit(make):
    image = strato.Image.debian_slim().pip_install("humanize")  # (the isolation tests')
    sb = make(image=image, ephemeral_disk=DISK_MB)
    code, out, err = run(sb, "python3", "-c", FILL, "/root/fill")  # its home: in the layer
    assert code == 0, err
    kind, mib = out.split()
    assert kind == "ENOSPC" and int(mib) <= DISK_MB, (out, err)
    assert run(sb, "rm", "/root/fill")[0] == 0
    assert run(sb, "python3", "-c", "import humanize")[0] == 0  # the image is intact


def test_disk_fill_in_a_function_stops_at_its_ephemeral_disk(strato_server, runtime):
    with apps.app.run(quiet=True):
        kind, mib = apps.fill[runtime].remote("/tmp/fill")
    assert kind == "ENOSPC" and apps.DISK_MB - 4 <= mib <= apps.DISK_MB, (kind, mib)


def test_default_disk_limit_applies(make):
    sb = make()
    code, out, _ = py(sb, "import os; s = os.statvfs('/tmp'); print(s.f_blocks * s.f_frsize)")
    assert code == 0
    from strato import settings

    assert int(out) <= settings.SANDBOX_DISK_MB.get() << 20


def test_a_warm_pool_sandbox_has_the_default_limits(strato_server, runtime):
    env = {
        "STRATO_SANDBOX_WARM_POOL": "1",
        "STRATO_SANDBOX_RUNTIME": runtime,
        "STRATO_SANDBOX_DISK_MB": "24",
    }
    with dedicated_server(env):
        app = strato.App.lookup("pool-limits", create_if_missing=True)
        pooled: list[str] = []

        def pool_ready() -> bool:
            raw = session.api().request_raw("GET", "/containers")
            found = msgspec.msgpack.decode(raw)["containers"]
            pooled[:] = [
                c["container_id"]
                for c in found
                if c["function_id"].startswith("fn-sb-") and c["state"] == "ready"
            ]
            return bool(pooled)

        wait_until(pool_ready, 90, "the warm pool to fill")
        shares = Path(f"/sys/fs/cgroup/cpu/strato/{pooled[0]}/cpu.shares")
        if shares.parent.parent.exists():  # cgroup v1 here (v2: cpu.weight)
            assert int(shares.read_text()) == 1024  # 1/64 core: the default weight
        sb = strato.Sandbox.create(app=app)
        code, out, err = py(sb, "import os; s = os.statvfs('/tmp'); print(s.f_blocks * s.f_frsize)")
        assert code == 0, err
        assert int(out) == 24 << 20
        sb.terminate()


def test_bad_ephemeral_disk_is_refused(cluster):
    for bad in (0, -5, 1.5, "10"):
        with pytest.raises(exc.InvalidError, match="ephemeral_disk"):
            strato.Sandbox.create(app=cluster[1], ephemeral_disk=bad)
    for limit in ({"ephemeral_disk": 64}, {"cidr_allowlist": ["10.0.0.0/8"]}):
        with pytest.raises(exc.InvalidError, match="'process' runtime cannot limit"):
            strato.Sandbox.create(app=cluster[1], runtime="process", **limit)


# --------------------------------------------------------------------------- CPU hog

SPIN = """
import os, sys, time
end = time.monotonic() + float(sys.argv[2])
for _ in range(int(sys.argv[1]) - 1):
    if os.fork() == 0:
        break
while time.monotonic() < end:
    pass
try:
    while True:
        os.wait()
except ChildProcessError:
    pass
"""
"""Spin on ``argv[1]`` processes for ``argv[2]`` seconds (each waits for its children)."""


def container_cpu_s(sb: strato.Sandbox) -> float:
    """CPU seconds the processes of ``sb``'s container have used, as the host counts them
    (with their reaped children's): a gVisor sandbox's own clock is no measure of it."""
    raw = session.api().request_raw("GET", "/containers")
    (cid,) = [
        c["container_id"]
        for c in msgspec.msgpack.decode(raw)["containers"]
        if c["function_id"] == "fn-" + sb.object_id
    ]
    for procs in (
        Path(f"/sys/fs/cgroup/pids/strato/{cid}/cgroup.procs"),  # v1
        Path(f"/sys/fs/cgroup/strato/{cid}/cgroup.procs"),  # v2
    ):
        if procs.exists():
            break
    ticks = 0
    for pid in procs.read_text().split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_cpu_hog_leaves_the_neighbour_its_share(make):
    neighbour, hog = make(), make()
    assert run(neighbour, "true")[0] == 0 and run(hog, "true")[0] == 0  # both up
    spinners = 8 * (os.cpu_count() or 1)
    before = container_cpu_s(neighbour), container_cpu_s(hog)
    hogging = hog.exec("python3", "-c", SPIN, str(spinners), "8", timeout=120)
    time.sleep(2.0)  # its spinners running
    working = neighbour.exec("python3", "-c", SPIN, "1", "4", timeout=120)
    assert working.wait() == 0 and hogging.wait() == 0, (
        working.stderr.read(),
        hogging.stderr.read(),
    )
    mine = (container_cpu_s(neighbour) - before[0]) / 4
    hogs = (container_cpu_s(hog) - before[1]) / 8
    print(f"CPUs used: the neighbour {mine:.2f}, the hog of {spinners} spinners {hogs:.2f}")
    # Much the same window, so the machine's other load weighs on both alike. Equal
    # weights: the neighbour's one process gets as much CPU as the hog's many (about a
    # core each on 2 cores); without cgroup weights it would get 1/spinners (0.06) of the hog's.
    # Timing-dependent: the hog's first and last two seconds are in its average but not in
    # the neighbour's window; other load then can move the ratio either way.
    assert mine >= 0.25 * hogs, (
        f"the neighbour used {mine:.2f} CPUs beside a hog of {spinners} spinners using "
        f"{hogs:.2f} (timing-dependent, see the comment above)"
    )


# --------------------------------------------------------------------------- cidr_allowlist

NET = "10.231.77"  # (test_network takes 10.213.x.y)
ALLOWED, DENIED, PORT = f"{NET}.2", f"{NET}.3", 18777


@pytest.fixture(scope="module")
def target_namespace() -> Iterator[None]:
    """A network namespace (held by a process of its own) with a veth to the host's:
    the host side ``.1``, inside ``.2`` and ``.3`` with one HTTP listener on both."""
    if not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.fail("this test needs iproute2 and nsenter")
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"])
    tag = uuid.uuid4().hex[:6]
    host_if, inner_if = f"sbl{tag}h", f"sbl{tag}t"
    server = None
    try:
        netns = f"/proc/{holder.pid}/ns/net"
        deadline = time.monotonic() + 10
        while os.readlink(netns) == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "the test's namespace was not made"
            time.sleep(0.01)
        inside = ["nsenter", f"--net={netns}", "--"]
        for cmd in (
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", inner_if],
            ["ip", "link", "set", inner_if, "netns", str(holder.pid)],
            ["ip", "addr", "add", f"{NET}.1/24", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            [*inside, "ip", "link", "set", "lo", "up"],
            [*inside, "ip", "addr", "add", f"{ALLOWED}/24", "dev", inner_if],
            [*inside, "ip", "addr", "add", f"{DENIED}/24", "dev", inner_if],
            [*inside, "ip", "link", "set", inner_if, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        server = subprocess.Popen(
            [*inside, sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while subprocess.run(
            ["curl", "-s", "-o", "/dev/null", f"http://{DENIED}:{PORT}/"], timeout=5
        ).returncode:
            assert time.monotonic() < deadline, "the test's listener did not come up"
            time.sleep(0.1)
        yield
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        holder.kill()
        holder.wait(timeout=10)


REACH = f"""
import socket, sys
for addr in sys.argv[1:]:
    try:
        socket.create_connection((addr, {PORT}), timeout=5).close()
        print(addr, "open")
    except OSError as e:
        print(addr, type(e).__name__)
"""


def test_cidr_allowlist_allows_only_its_ranges(make, target_namespace):
    free, fenced = make(), make(cidr_allowlist=[f"{ALLOWED}/32"])
    _, out, err = run(free, "python3", "-c", REACH, ALLOWED, DENIED)
    assert out.split() == [ALLOWED, "open", DENIED, "open"], (out, err)
    _, out, err = run(fenced, "python3", "-c", REACH, ALLOWED, DENIED)
    seen = dict(zip(out.split()[::2], out.split()[1::2], strict=True))
    assert seen[ALLOWED] == "open", (out, err)
    assert seen[DENIED] != "open", (out, err)


def test_bad_cidr_allowlist_is_refused(cluster):
    with pytest.raises(exc.InvalidError, match="not an address range"):
        strato.Sandbox.create(app=cluster[1], cidr_allowlist=["10.0.0.1/8"])
    with pytest.raises(exc.InvalidError, match="not an address range"):
        strato.Sandbox.create(app=cluster[1], cidr_allowlist=["example.com"])
    with pytest.raises(exc.InvalidError, match="block_network"):
        strato.Sandbox.create(app=cluster[1], cidr_allowlist=["10.0.0.0/8"], block_network=True)
    # the control plane checks too (a client that skips the SDK's check)
    body = m.CreateSandbox(app_id=cluster[1].app_id, cidr_allowlist=["10.1.2.3/8"])
    with pytest.raises(exc.InvalidError, match="not an address range"):
        session.api().call("POST", "/sandboxes", body, m.SandboxInfo)
