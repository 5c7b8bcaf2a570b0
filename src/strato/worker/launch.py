"""From a ``ContainerStart`` to a ``ContainerLaunch``: the image's layers (built here on
first use), the shipped code, strato's own runtime, the channel socket and the
environment, at host paths for the ``process`` runtime and at fixed paths inside the
container for the isolating ones."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

import strato
from strato import settings
from strato.protocol import frames
from strato.protocol import messages as m
from strato.protocol.images import DEFAULT_PATH
from strato.runtime.base import Bind, ContainerLaunch

from .mounts import materialize

IN_CONTAINER = "/run/strato"  # inside isolating runtimes: /run is the container's own
STRATO_SRC = IN_CONTAINER + "/src"  # strato's own package, bound read-only
MOUNTS = IN_CONTAINER + "/mounts"  # the app's shipped code, one dir per root
IMAGE_PYTHONPATH = "/root"  # where add_local_python_source puts modules (as Modal)

FUNCTION_ARGS = ["-m", "strato.container"]
SANDBOX_ARGS = ["-S", "-m", "strato.container.sandbox_entry"]  # a sandbox's agent only
NATIVE_AGENT = IN_CONTAINER + "/container/sandbox-agent"  # the native sandbox agent
ENTRY_ARGS = (FUNCTION_ARGS, SANDBOX_ARGS)  # the interpreter's arguments of a container

_STRATO_PACKAGE = Path(strato.__file__).resolve().parent
_MSGSPEC_DIR = os.path.dirname(os.path.dirname(msgspec.__file__))  # (a sandbox agent's path)


def isolated_path() -> str:
    """``PATH`` in an image-less isolated container (a minimal root: the host's ``/usr``
    and the interpreter's folders): the interpreter's folder, then the default one."""
    return os.pathsep.join([os.path.dirname(sys.executable), DEFAULT_PATH])


def image_cache(home: Path) -> Path:
    """The machine's image build cache: ``STRATO_IMAGE_CACHE``, else ``$STRATO_HOME/images``
    (shared by every worker agent of this machine)."""
    return settings.IMAGE_CACHE.get() or home / "images"


def prepare_launch(
    msg: m.ContainerStart,
    *,
    cache: Path,
    isolated: bool,
    fetch_blob: Callable[[str], bytes],
    log: Callable[[str], None],
) -> ContainerLaunch:
    spec = msg.spec
    host_dir = cache / "containers" / msg.container_id
    host_dir.mkdir(parents=True, exist_ok=True)
    (host_dir / "spec.msgpack").write_bytes(msgspec.msgpack.encode(spec))
    mount_dirs = materialize(msg.mount, str(cache), fetch_blob) if msg.mount is not None else []
    image = None
    if spec.image is not None:
        if not isolated:
            from strato.exceptions import InvalidError

            raise InvalidError(
                "the 'process' runtime cannot run an image (it runs on the host); use the "
                "bwrap or gvisor runtime"
            )
        from strato.images import build

        image = build(spec.image, image_cache(cache.parent), fetch_blob=fetch_blob, log=log)
    family, channel_path = frames.parse_address(msg.channel)
    binds: list[Bind] = []
    native = None  # a sandbox's native agent (isolating runtimes), or its Python one
    if spec.sandbox is not None and isolated:
        from .native_agent import agent_binary, channel_supported

        if channel_supported(msg.channel):
            native = agent_binary()
    if isolated:
        # the container runs as an unprivileged user: it must read its spec (the folders
        # above stay private to the worker's user; bwrap binds them as root)
        os.chmod(host_dir, 0o755)
        os.chmod(host_dir / "spec.msgpack", 0o644)
        binds.append(Bind(str(host_dir), IN_CONTAINER + "/container", readonly=True))
        spec_path = IN_CONTAINER + "/container/spec.msgpack"
        paths = []
        for i, d in enumerate(mount_dirs):
            binds.append(Bind(d, f"{MOUNTS}/{i}", readonly=True))
            paths.append(f"{MOUNTS}/{i}")
        home = "/root"  # the image's, or (without one) a fresh tmpfs
    else:
        spec_path, paths, home = str(host_dir / "spec.msgpack"), mount_dirs, str(host_dir)
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "STRATO_CONTAINER_ID": msg.container_id,
        "STRATO_CHANNEL": msg.channel,
        "STRATO_CONTAINER_TOKEN": msg.token,
        "STRATO_CONTAINER_SPEC": spec_path,
        "STRATO_MOUNT_PATHS": os.pathsep.join(paths),
        "STRATO_FUNCTION_ID": msg.function_id,
        "STRATO_APP_ID": msg.app_id,
    }
    python = sys.executable
    workdir = None
    if isolated and native is None:  # the minimal root has the interpreter, not the checkout
        binds.append(Bind(str(_STRATO_PACKAGE), f"{STRATO_SRC}/strato", readonly=True))
        env["PYTHONPATH"] = STRATO_SRC
    if image is not None:
        env.update(image.env)
        env["PYTHONPATH"] = os.pathsep.join([STRATO_SRC, image.strato_deps, IMAGE_PYTHONPATH])
        python = image.python
        workdir = image.workdir or "/root"
    elif isolated:  # the minimal root has the host's /usr and the interpreter's folders,
        # not the worker's other PATH entries (each an exec of a bare name would try, a
        # failed execve each: ~0.1 ms under gVisor; and they name the worker's folders)
        env["PATH"] = isolated_path()
    env.update(spec.env)
    env.update(msg.secret_env)  # --- secrets: in this container's environment only
    argv = [python, *FUNCTION_ARGS]
    if native is not None:  # --- sandboxes: the native agent (no interpreter starts), in
        # the container's folder (bound read-only): no bind of its own (each is a gofer
        # mount of gVisor's start)
        _place_agent(native, host_dir / "sandbox-agent")
        argv = [NATIVE_AGENT]
        env.pop("PYTHONPATH", None)
    elif spec.sandbox is not None:  # --- sandboxes: the agent, without site (-S): it needs
        # only strato and msgspec, and its start skips site-packages and their .pth files
        argv = [python, *SANDBOX_ARGS]
        deps = image.strato_deps if image is not None else _MSGSPEC_DIR
        strato_dir = STRATO_SRC if isolated else str(_STRATO_PACKAGE.parent)
        env["PYTHONPATH"] = os.pathsep.join([strato_dir, deps])
    res = spec.resources
    return ContainerLaunch(
        container_id=msg.container_id,
        argv=argv,
        env=env,
        cwd=str(host_dir),
        cpu=res.cpu_limit,
        memory_mb=res.memory_limit_mb,
        pids_max=settings.CONTAINER_PIDS_MAX.get(),
        cpu_request=res.cpu,
        disk_mb=spec.ephemeral_disk_mb,
        cidr_allowlist=spec.cidr_allowlist,
        gpu_indices=list(msg.gpu_indices),
        block_network=spec.block_network,
        rootfs_layers=list(image.layers) if image is not None else [],
        binds=binds,
        channel_socket=str(channel_path) if family == "unix" and isolated else None,
        workdir=workdir,
    )


def _place_agent(binary: Path, at: Path) -> None:
    """A hard link to the machine's build (a copy across filesystems)."""
    try:
        os.link(binary, at)
    except FileExistsError:
        pass
    except OSError:
        import shutil

        shutil.copyfile(binary, at)
        os.chmod(at, 0o755)


def compile_strato(native: bool = False) -> None:
    """Write the bytecode of strato's own package (``__pycache__``, as ``pip install``
    does), so a container does not compile the modules it imports at every start: they
    run with ``PYTHONDONTWRITEBYTECODE`` from a read-only bind, and under gVisor compiling
    the sandbox agent's modules took longer than the sandbox's boot. Files already
    compiled are skipped; a package this user may not write to is left as it is.
    ``native``: the native sandbox agent is built too (else the first sandbox waits)."""
    import compileall

    try:
        compileall.compile_dir(_STRATO_PACKAGE, quiet=2)
    except OSError:
        pass
    if native:
        from strato.exceptions import InvalidError

        from .native_agent import agent_binary

        try:
            agent_binary()
        except InvalidError:
            pass  # (STRATO_SANDBOX_AGENT=native: each sandbox's start says why)
