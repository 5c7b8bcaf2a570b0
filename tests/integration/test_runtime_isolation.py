"""The isolating runtimes (bwrap, gVisor) with real containers on this machine.

The same behaviour tests run on both. Images are small layer sets built once per machine
from the host's own Debian Python (``/usr/bin/python3.11`` with its standard library and
shared libraries) under ``/tmp/strato-test-rootfs``; no debootstrap, no network.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from strato.exceptions import InvalidError
from strato.runtime import Bind, ContainerLaunch, ExitStatus, get_runtime
from strato.runtime.base import CHANNEL_PATH, Runtime
from strato.runtime.bwrap import BwrapContainer, BwrapRuntime, build_args
from strato.runtime.devices import cuda_visible_devices, gpu_device_nodes
from strato.runtime.gvisor import GvisorContainer, GvisorRuntime
from strato.runtime.isolation import container_ids, interpreter_dirs
from strato.runtime.rootfs import resolve_in_root

T = TypeVar("T")
TIMEOUT_S = 60.0
RUNTIMES = ["bwrap", "gvisor"]
IMAGE_PYTHON = "/usr/bin/python3"
ROOTFS_CACHE = Path("/tmp/strato-test-rootfs")
HOST_PYTHON = "/usr/bin/python3.11"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="isolating runtimes need root")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


# ---- runtimes and cleanup -------------------------------------------------------------

Started = BwrapContainer | GvisorContainer
_STARTED: list[Started] = []


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> Runtime:
    name = request.param
    binary = {"bwrap": "bwrap", "gvisor": "runsc"}[name]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")
    rt = get_runtime(name)
    if not rt.capabilities.cgroups:
        pytest.skip(f"cgroups are not usable here: {getattr(rt, 'cgroup_reason', '?')}")
    return rt


@pytest.fixture(autouse=True)
def _reap_leftovers() -> Iterator[None]:
    """A failing test leaves nothing behind: kill and clean up every container it started."""
    yield
    while _STARTED:
        c = _STARTED.pop()
        if not c._cleaned:
            c.signal(signal.SIGKILL)
            c._cleanup()


def launch(code: str, *, image: list[str] | None = None, **kwargs: Any) -> ContainerLaunch:
    """Run Python ``code``: the host's interpreter (no image) or the image's."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    home = kwargs.pop("env_home", None)
    if home is not None:
        env["HOME"] = home
    return ContainerLaunch(
        container_id=f"test-{uuid.uuid4().hex[:12]}",
        argv=[IMAGE_PYTHON if image else sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=kwargs.pop("cwd", "/"),
        rootfs_layers=list(image or []),
        **kwargs,
    )


async def start(rt: Runtime, spec: ContainerLaunch) -> Started:
    c = await rt.start(spec)
    assert isinstance(c, BwrapContainer | GvisorContainer)
    _STARTED.append(c)
    return c


async def complete(rt: Runtime, spec: ContainerLaunch) -> tuple[str, str, ExitStatus]:
    c = await start(rt, spec)
    out, err = await asyncio.gather(c.stdout.read(), c.stderr.read())
    return out.decode(), err.decode(), await c.wait()


def finished(rt: Runtime, spec: ContainerLaunch) -> tuple[str, str, ExitStatus]:
    return run(complete(rt, spec))


def json_out(rt: Runtime, spec: ContainerLaunch) -> Any:
    out, err, status = finished(rt, spec)
    assert status.exit_code == 0, f"{status.description}: {err}"
    return json.loads(out)


def mounts_of(container_id: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if
            container_id in line]  # fmt: skip


def assert_cleaned_up(c: Started) -> None:
    assert c.container_dir is None or not c.container_dir.path.exists()
    assert not mounts_of(c.container_id), "a mount of the container is left behind"
    assert c.cgroup is not None and not any(d.exists() for d in c.cgroup.dirs.values())


# ---- a small image --------------------------------------------------------------------


def _replicate(path: str, root: Path) -> None:
    """Copy host ``path`` into ``root`` at the same place, with the symlinks on its way."""
    parts = [p for p in path.split("/") if p]
    done = "/"
    while parts:
        name = parts.pop(0)
        host = os.path.join(done, name)
        inside = root / host.lstrip("/")
        if os.path.islink(host):
            target = os.readlink(host)
            if not os.path.lexists(inside):
                inside.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, inside)
            if target.startswith("/"):
                done = "/"
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not parts:
            inside.parent.mkdir(parents=True, exist_ok=True)
            if not inside.exists():
                shutil.copy2(host, inside)
        done = os.path.normpath(host)


def _shared_libraries(binaries: list[str]) -> set[str]:
    found: set[str] = set()
    for chunk in range(0, len(binaries), 50):
        out = subprocess.run(
            ["ldd", *binaries[chunk : chunk + 50]], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            if line.endswith(":"):  # the header naming the file ldd looks at
                continue
            path = line.split("=>")[-1].split()[0] if line.strip() else ""
            if path.startswith("/"):
                found.add(path)
    return found


def _build_image(dest: Path) -> None:
    base, top = dest / "base", dest / "top"
    for name in ("proc", "dev", "sys", "tmp", "run", "root", "etc", "srv"):
        (base / name).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "lib64", "sbin"):  # merged /usr, as on the host
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), base / name)
    _replicate(HOST_PYTHON, base)
    os.symlink("python3.11", base / "usr/bin/python3")
    shutil.copytree(
        "/usr/lib/python3.11",
        base / "usr/lib/python3.11",
        symlinks=True,
        ignore=shutil.ignore_patterns("test", "idlelib", "tkinter", "turtledemo"),
    )
    dynload = [str(p) for p in Path("/usr/lib/python3.11/lib-dynload").glob("*.so")]
    for lib in sorted(_shared_libraries([HOST_PYTHON, *dynload])):
        _replicate(lib, base)
    (base / "etc/os-release").write_text('ID=strato-base\nPRETTY_NAME="strato base layer"\n')
    (base / "srv/shadowed.txt").write_text("base\n")
    (base / "srv/base-only.txt").write_text("base\n")
    (top / "etc").mkdir(parents=True)
    (top / "srv").mkdir()
    (top / "etc/os-release").write_text('ID=strato-test\nPRETTY_NAME="strato test image"\n')
    (top / "srv/shadowed.txt").write_text("top\n")


@pytest.fixture(scope="session")
def image() -> list[str]:
    """Two layers, bottom first: ``base`` (Python, libraries) and ``top`` (os-release...)."""
    if not os.path.exists(HOST_PYTHON) or shutil.which("ldd") is None:
        pytest.skip(f"building the test image needs {HOST_PYTHON} and ldd")
    stat = os.stat(HOST_PYTHON)
    dest = ROOTFS_CACHE / f"py311-{stat.st_size}-{stat.st_mtime_ns}"
    if not (dest / "done").exists():
        ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=ROOTFS_CACHE, prefix="build-"))
        _build_image(building)
        (building / "done").touch()
        try:
            building.rename(dest)
        except OSError:  # built by another session meanwhile
            shutil.rmtree(building)
    return [str(dest / "base"), str(dest / "top")]


def _tree(path: str) -> dict[str, tuple[int, float]]:
    found = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            st = os.lstat(p)
            found[os.path.relpath(p, path)] = (st.st_size, st.st_mtime)
    return found


# ---- servers on the host ---------------------------------------------------------------


class Server:
    """Accepts connections in a thread and answers each with ``echo:<what it received>``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.listen()
        sock.settimeout(0.2)
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    data = conn.recv(1024)
                    conn.sendall(b"echo:" + data)
                    self.served += 1
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def tcp_server() -> Iterator[tuple[int, Server]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    server = Server(s)
    yield s.getsockname()[1], server
    server.close()


@pytest.fixture
def unix_server() -> Iterator[tuple[str, Server]]:
    directory = tempfile.mkdtemp(prefix="strato-chan-")
    path = os.path.join(directory, "channel.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    server = Server(s)
    yield path, server
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


# ---- basics ----------------------------------------------------------------------------


def test_streams_and_exit_code(runtime: Runtime) -> None:
    out, err, status = finished(
        runtime, launch("import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)")
    )
    assert out == "hello\n" and err == "oops\n"
    assert status == ExitStatus(exit_code=3, signal=None, oom_killed=False, memory_mb=None)


def test_environment_hostname_and_workdir(runtime: Runtime, image: list[str]) -> None:
    code = """
        import json, os, socket
        print(json.dumps([dict(os.environ), socket.gethostname(), os.getcwd()]))
    """
    spec = launch(code, image=image, hostname="box-1", workdir="/app/src")
    spec.env = {"ONLY": "this", "PATH": "/usr/bin:/bin"}
    env, hostname, cwd = json_out(runtime, spec)
    assert env["ONLY"] == "this" and "STRATO_CHANNEL" not in env
    assert not set(env) - {"ONLY", "PATH", "PWD", "HOME", "LC_CTYPE"}
    assert hostname == "box-1" and cwd == "/app/src"


def test_signals_are_reported(runtime: Runtime) -> None:
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    assert finished(runtime, launch(crash))[2].signal == signal.SIGSEGV

    async def killed() -> ExitStatus:
        c = await start(runtime, launch("import time; print('ready', flush=True); time.sleep(60)"))
        assert await c.stdout.readline() == b"ready\n"
        c.signal(signal.SIGKILL)
        status = await c.wait()
        c.signal(signal.SIGKILL)  # gone: no error
        return status

    status = run(killed())
    assert status.signal == signal.SIGKILL and not status.oom_killed


def test_stop_lets_sigterm_handler_finish(runtime: Runtime) -> None:
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        print('ready', flush=True)
        time.sleep(60)
    """

    async def main() -> tuple[ExitStatus, float]:
        c = await start(runtime, launch(code))
        assert await c.stdout.readline() == b"ready\n"
        began = time.monotonic()
        status = await c.stop(10)
        return status, time.monotonic() - began

    status, elapsed = run(main())
    assert status.exit_code == 7 and elapsed < 5


def test_missing_executable_raises(runtime: Runtime, image: list[str]) -> None:
    for spec in (launch("", image=image), launch("")):
        spec.argv = ["no-such-program-strato"]
        with pytest.raises(FileNotFoundError):
            run(runtime.start(spec))
        assert not mounts_of(spec.container_id)


# ---- filesystems -----------------------------------------------------------------------


def own_tmp(spec: ContainerLaunch) -> list[str]:
    """What a container's fresh /tmp holds: only the mount points of the interpreter's
    folders, where they live under the host's /tmp (a venv in a CI checkout)."""
    return sorted(
        {d.split("/")[2] for d in interpreter_dirs(spec.argv[0]) if d.startswith("/tmp/")}
    )


def test_host_files_are_invisible_without_an_image(runtime: Runtime, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host only")
    state_dir = str(runtime.state_dir)  # type: ignore[attr-defined]
    code = f"""
        import json, os
        state = {state_dir!r}
        try:
            open('/strato-write-test', 'w')
            root_writable = True
        except OSError:
            root_writable = False
        open('/tmp/scratch', 'w').write('mine')
        print(json.dumps({{
            'secret': os.path.exists({str(secret)!r}),
            'tmp': sorted(os.listdir('/tmp')),
            'state': os.listdir(state) if os.path.isdir(state) else [],
            'usr': os.path.isdir('/usr/lib'),
            'root_writable': root_writable,
        }}))
    """
    spec = launch(code)
    seen = json_out(runtime, spec)
    assert seen == {
        "secret": False,
        "tmp": sorted({"scratch", *own_tmp(spec)}),
        "state": [],
        "usr": True,
        "root_writable": False,
    }
    assert not os.path.exists("/strato-write-test") and not os.path.exists("/tmp/scratch")


def test_image_layers_and_writable_layer(runtime: Runtime, image: list[str]) -> None:
    before = {layer: _tree(layer) for layer in image}
    host_file = Path(tempfile.mkdtemp(dir="/var/tmp")) / "host.txt"
    host_file.write_text("host")
    code = f"""
        import json, os
        seen = {{
            'os_release': open('/etc/os-release').read(),
            'shadowed': open('/srv/shadowed.txt').read(),
            'base_only': open('/srv/base-only.txt').read(),
            'host_file': os.path.exists({str(host_file)!r}),
            'host_tree': os.path.exists('/work') or os.path.exists('/home'),
            'previous_write': os.path.exists('/root/written.txt'),
            'uid': os.getuid(),
        }}
        open('/root/written.txt', 'w').write('new')  # its home: the container's user's
        denied = []
        for action in (lambda: open('/srv/written.txt', 'w'),
                       lambda: open('/srv/shadowed.txt', 'a'),
                       lambda: os.remove('/srv/base-only.txt'),
                       lambda: os.makedirs('/usr/local/new/dir')):
            try:
                action()
            except PermissionError:
                denied.append(True)
        seen['denied'] = len(denied)
        print(json.dumps(seen))
    """
    try:
        for _ in range(2):  # the second container starts from the image, not the first's writes
            seen = json_out(runtime, launch(code, image=image, env_home="/root"))
            assert seen == {
                "os_release": 'ID=strato-test\nPRETTY_NAME="strato test image"\n',
                "shadowed": "top\n",
                "base_only": "base\n",
                "host_file": False,
                "host_tree": False,
                "previous_write": False,
                "uid": container_ids()[0],
                "denied": 4,  # the image's own files are root's: read-only to the container
            }
    finally:
        shutil.rmtree(host_file.parent)
    assert {layer: _tree(layer) for layer in image} == before, "a write reached a layer"


def test_cleanup_after_exit(runtime: Runtime, image: list[str]) -> None:
    async def main() -> list[Started]:
        done = []
        for spec in (launch("print(1)", image=image, memory_mb=200), launch("print(1)")):
            c = await start(runtime, spec)
            await c.stdout.read()
            assert (await c.wait()).exit_code == 0
            done.append(c)
        return done

    for c in run(main()):
        assert_cleaned_up(c)


def test_binds_readonly_and_writable(runtime: Runtime, image: list[str], tmp_path: Path) -> None:
    code_dir, data_dir = tmp_path / "code", tmp_path / "data"
    code_dir.mkdir()
    data_dir.mkdir()
    (code_dir / "app.py").write_text("VALUE = 42\n")
    code = """
        import json
        try:
            open('/code/new.py', 'w')
            code_writable = True
        except OSError:
            code_writable = False
        open('/data/out.txt', 'w').write('from the container')
        print(json.dumps([open('/code/app.py').read(), code_writable]))
    """
    uid, gid = container_ids()
    os.chown(data_dir, uid, gid)  # a writable bind is the container's user's to write
    binds = [Bind(str(code_dir), "/code"), Bind(str(data_dir), "/data", readonly=False)]
    assert json_out(runtime, launch(code, image=image, binds=binds)) == ["VALUE = 42\n", False]
    assert (data_dir / "out.txt").read_text() == "from the container"
    written = (data_dir / "out.txt").stat()
    assert (written.st_uid, written.st_gid) == (uid, gid) and uid != 0, "written as root"
    assert not (code_dir / "new.py").exists()


def test_bind_without_image_at_any_path(runtime: Runtime, tmp_path) -> None:
    """A minimal root is the container's own: a bind can go where the host has nothing."""
    code = "import os; print(os.listdir('/strato-no-such-dir'), os.listdir('/tmp/code'))"
    (tmp_path / "f").touch()
    tmp_path.chmod(0o755)  # the container's user reads it
    binds = [Bind(str(tmp_path), "/strato-no-such-dir"), Bind(str(tmp_path), "/tmp/code")]
    out, err, status = finished(runtime, launch(code, binds=binds))
    assert status.exit_code == 0, err
    assert out.strip() == "['f'] ['f']"
    assert not os.path.exists("/strato-no-such-dir")


# ---- processes -------------------------------------------------------------------------


def test_containers_see_only_their_own_processes_and_tmp(runtime: Runtime) -> None:
    token = uuid.uuid4().hex
    first_code = f"""
        import time
        open('/tmp/first-{token}', 'w').write('x')
        print('ready', flush=True)
        time.sleep(60)
    """
    second_code = """
        import json, os
        pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]
        cmdlines = []
        for p in pids:
            try:
                cmdlines.append(open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace'))
            except OSError:
                pass
        print(json.dumps({'pids': pids, 'cmdlines': cmdlines, 'tmp': os.listdir('/tmp'),
                          'me': os.getpid()}))
    """

    async def main() -> dict[str, Any]:
        first = await start(runtime, launch(first_code))
        assert await first.stdout.readline() == b"ready\n"
        out, err, status = await complete(runtime, launch(second_code))
        assert status.exit_code == 0, err
        first.signal(signal.SIGKILL)
        await first.wait()
        return json.loads(out)

    seen = run(main())
    # nothing of the other container's /tmp; only the interpreter's own binds, if any
    assert seen["tmp"] == own_tmp(launch(second_code))
    assert not any(token in c for c in seen["cmdlines"]), "saw the other container's process"
    assert len(seen["pids"]) <= 3 and seen["me"] <= 3, seen["pids"]  # init, maybe bwrap's


def test_oom_killed(runtime: Runtime) -> None:
    spec = launch("x = b'1' * (512 << 20); print('survived')", memory_mb=128)
    out, _, status = finished(runtime, spec)
    assert "survived" not in out
    assert status.oom_killed and status.signal == signal.SIGKILL
    assert "128 MiB" in status.description


def test_fork_bomb_stopped_by_pids_limit(runtime: Runtime) -> None:
    code = """
        import json, os, time
        children, errors = [], 0
        for _ in range(300):  # bounded: a real bomb would not stop by itself
            try:
                pid = os.fork()
            except OSError:
                errors += 1
                continue
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        print(json.dumps({'children': len(children), 'errors': errors}), flush=True)
    """

    async def main() -> tuple[dict[str, int], ExitStatus, Started]:
        c = await start(runtime, launch(code, pids_max=20))
        line = await c.stdout.readline()
        return json.loads(line), await c.wait(), c

    report, status, c = run(main())
    assert status.exit_code == 0, status.description
    assert 0 < report["children"] < 20 and report["errors"] == 300 - report["children"]
    assert_cleaned_up(c)
    out, _, again = finished(runtime, launch("print('healthy')"))  # the node still works
    assert again.exit_code == 0 and out == "healthy\n"


# ---- network ---------------------------------------------------------------------------

CONNECT = """
    import socket, sys
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(('127.0.0.1', {port}))
        s.sendall(b'hi')
        print(s.recv(100).decode())
    except OSError as e:
        print(type(e).__name__)
"""


def test_host_loopback_unreachable_with_or_without_network(
    runtime: Runtime, tcp_server: tuple[int, Server]
) -> None:
    """127.0.0.1 inside is the container's own loopback, with block_network or egress."""
    port, server = tcp_server
    for block in (True, False):
        spec = launch(CONNECT.format(port=port), block_network=block)
        out, err, status = finished(runtime, spec)
        assert status.exit_code == 0, err
        assert out.strip() in ("ConnectionRefusedError", "OSError"), (block, out)
    assert server.served == 0


@pytest.mark.parametrize("with_image", [False, True], ids=["host-root", "image"])
def test_channel_socket_reachable_without_network(
    runtime: Runtime, unix_server: tuple[str, Server], image: list[str], with_image: bool
) -> None:
    path, server = unix_server
    code = """
        import os, socket
        family, _, where = os.environ['STRATO_CHANNEL'].partition(':')
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(where)
        s.sendall(b'ping')
        print(os.environ['STRATO_CHANNEL'], s.recv(100).decode())
    """
    spec = launch(
        code, image=image if with_image else None, channel_socket=path, block_network=True
    )
    out, err, status = finished(runtime, spec)
    assert status.exit_code == 0, err
    assert out.split() == [f"unix:{CHANNEL_PATH}", "echo:ping"] and server.served == 1
    assert not os.path.exists("/run/strato/channel.sock")


# ---- runtime specifics -----------------------------------------------------------------


def test_default_runtime_is_bwrap_where_installed(monkeypatch) -> None:
    monkeypatch.delenv("STRATO_RUNTIME", raising=False)
    expected = "bwrap" if shutil.which("bwrap") else "process"
    assert get_runtime().name == expected
    monkeypatch.setenv("STRATO_RUNTIME", "process")
    assert get_runtime().name == "process"


def test_gvisor_refuses_gpus() -> None:
    if shutil.which("runsc") is None:
        pytest.skip("runsc is not installed")
    rt = GvisorRuntime(use_cgroups=False)
    assert not rt.capabilities.gpu
    with pytest.raises(InvalidError, match="GPU"):
        run(rt.start(launch("pass", gpu_indices=[0])))


def test_gpu_device_nodes_and_arguments(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    nodes = gpu_device_nodes([2, 0], dev=str(dev))
    assert nodes == [str(dev / n) for n in ("nvidia2", "nvidia0", "nvidiactl", "nvidia-uvm")]
    assert gpu_device_nodes([], dev=str(dev)) == []
    with pytest.raises(FileNotFoundError, match="GPU 5"):
        gpu_device_nodes([5], dev=str(dev))

    args = build_args(launch("pass", gpu_indices=[2, 0]), rootfs=None, workdir="/", gpu_nodes=nodes)
    binds = [args[i + 1 : i + 3] for i, a in enumerate(args) if a == "--dev-bind"]
    assert binds == [[n, n] for n in nodes]
    assert args.index("--dev") < args.index("--dev-bind")  # on the container's own /dev
    assert "--unshare-net" in args  # always: egress is attached to it, or nothing
    assert "--unshare-net" in build_args(
        launch("pass", block_network=True), rootfs="/r", workdir="/", gpu_nodes=[]
    )

    gpus = tmp_path / "gpus"
    for minor, uuid_ in ((0, "GPU-aaa"), (2, "GPU-ccc")):
        (gpus / f"0000:0{minor}:00.0").mkdir(parents=True)
        (gpus / f"0000:0{minor}:00.0" / "information").write_text(
            f"Model: \t\t NVIDIA H100\nGPU UUID: \t {uuid_}\nDevice Minor: \t {minor}\n"
        )
    assert cuda_visible_devices([2, 0], driver_gpus=str(gpus)) == "GPU-ccc,GPU-aaa"
    assert cuda_visible_devices([1, 2], driver_gpus=str(gpus)) == "0,1"  # no UUID for 1
    assert cuda_visible_devices([1], driver_gpus=str(tmp_path / "none")) == "0"


def test_bwrap_gpu_environment() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed")
    rt = BwrapRuntime(use_cgroups=False, gpus_present=True)
    out, err, status = finished(
        rt, launch("import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    )
    assert status.exit_code == 0, err
    assert out.strip() == "''"  # a GPU node without GPUs for this container: none visible


def test_resolve_in_root(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/tool").touch()
    os.symlink("usr/bin", tmp_path / "bin")
    os.symlink("/usr/bin/tool", tmp_path / "usr/bin/abs-link")  # absolute: inside the root
    assert resolve_in_root(str(tmp_path), "/bin/tool") == str(tmp_path / "usr/bin/tool")
    assert resolve_in_root(str(tmp_path), "/bin/abs-link") == str(tmp_path / "usr/bin/tool")
    assert resolve_in_root(str(tmp_path), "/../../bin/tool") == str(tmp_path / "usr/bin/tool")
    assert resolve_in_root(str(tmp_path), "/bin/missing") is None


def test_seccomp_filter_loads_in_a_forked_process() -> None:
    """``load_filter`` (what a zygote's forked container calls): after it, a denied call
    fails with EPERM, the rest work, and /proc/self/status says so."""
    import ctypes
    import errno

    from strato.runtime.seccomp import filter_bpf, load_filter

    bpf = filter_bpf()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        try:
            load_filter(bpf)
            libc = ctypes.CDLL(None, use_errno=True)
            denied = libc.unshare(0x10000000) == -1 and ctypes.get_errno() == errno.EPERM
            with open("/proc/self/status") as f:
                mode = [ln.split()[1] for ln in f if ln.startswith("Seccomp:")][0]
            allowed = os.getpid() > 0 and subprocess.run(["true"]).returncode == 0
            os.write(w, json.dumps([denied, mode, allowed]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read())
    os.waitpid(pid, 0)
    assert got == [True, "2", True]
