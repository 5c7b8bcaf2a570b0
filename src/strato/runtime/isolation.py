"""What the isolating runtimes (``bwrap``, ``gvisor``) share: checking a launch, the minimal
root of a container without an image, the unprivileged user containers run as, where a
container without an image starts, and the capabilities a root process would keep.

**The user.** Containers run as ``$STRATO_CONTAINER_UID``:``$STRATO_CONTAINER_GID`` (default
65534:65534, ``nobody``:``nogroup``), the same number inside and on the host, with no
capabilities and no supplementary groups: under bwrap the sandbox is set up as root and
the program is then run through ``setpriv`` (so whatever it writes to a bind is owned by
that uid on the host); under gVisor the sandbox's process is given that user.

**The minimal root** (:func:`minimal_root`) of a container without an image holds only:
the system directories (``/usr`` and the ``/bin``, ``/sbin``, ``/lib*`` links or folders),
the interpreter's prefixes (``sys.prefix``, ``sys.base_prefix`` and the program's virtual
environment, each exactly, never a parent), a few files of ``/etc`` (no secrets:
``passwd`` and ``group`` are rewritten without password fields, and no ``shadow``,
``gshadow``, ``sudoers``, ssh keys or tool configurations), fresh ``/tmp``, ``/root`` and
``/home``, its own ``/run``, ``/proc`` and ``/dev``, and the launch's binds. Nothing else of
the host: no checkouts, no homes, no ``/var``, ``/srv``, ``/opt``, ``/mnt``..."""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from strato.exceptions import InvalidError
from strato.runtime.base import CHANNEL_ENV, CHANNEL_PATH, Bind, ContainerLaunch
from strato.runtime.cgroups import validate_limits

DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
"""Docker's default set: what the root process of a container may do (no ``CAP_SYS_ADMIN``,
``CAP_NET_ADMIN``, ``CAP_SYS_PTRACE``, ``CAP_SYS_RESOURCE``...)."""

OWN_DIRS = ("/tmp", "/run", "/proc", "/dev", "/sys")
"""Directories a container without an image gets of its own instead of the host's."""

UID_ENV = "STRATO_CONTAINER_UID"
GID_ENV = "STRATO_CONTAINER_GID"
DEFAULT_UID = 65534
DEFAULT_GID = 65534

SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""Top-level directories (or links into ``/usr``) a container without an image gets."""

FRESH_DIRS = ("/tmp", "/root", "/home")
"""Empty, writable (tmpfs) directories of a container without an image."""

ETC_FILES = (
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "protocols",
    "services",
    "networks",
    "ethertypes",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "crypto-policies",
    "alternatives",
    "os-release",
    "debian_version",
    "mime.types",
    "locale.alias",
    "fonts",
    "python3",
    f"python{sys.version_info[0]}.{sys.version_info[1]}",
)
"""What a container without an image sees of the host's ``/etc`` (besides ``passwd`` and
``group``, given rewritten): name resolution, TLS roots, the dynamic linker's cache, time
zone, alternatives links, Debian's Python site configuration. Never ``shadow``,
``gshadow``, ``sudoers``, ``ssh``, ``machine-id``, nor tools' configurations (``pip.conf``,
``gitconfig``, ``npmrc``...), which may hold credentials."""


def container_ids() -> tuple[int, int]:
    """The uid and gid containers run as (inside and on the host)."""
    uid = int(os.environ.get(UID_ENV) or DEFAULT_UID)
    gid = int(os.environ.get(GID_ENV) or DEFAULT_GID)
    if uid <= 0 or gid <= 0:
        raise InvalidError(
            f"${UID_ENV}/${GID_ENV} must name an unprivileged user and group (not 0)."
        )
    return uid, gid


@dataclass(frozen=True)
class RootEntry:
    """One step of building a minimal root: ``kind`` is ``"ro"`` (bind ``src`` read-only at
    ``dst``), ``"symlink"`` (``dst`` -> ``src``) or ``"tmpfs"`` (a fresh ``dst``)."""

    kind: str
    src: str
    dst: str


def sanitized_etc(state_dir: str | os.PathLike[str]) -> Path:
    """``<state dir>/etc`` holding the host's ``passwd`` and ``group`` without password
    fields (``x``), with ``nobody``/``nogroup`` and the container's ids present; rewritten
    when the host's change. Readable by everyone (no secrets)."""
    out = Path(state_dir) / "etc"
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    uid, gid = container_ids()
    for name, fields, extra in (
        ("passwd", 7, f"strato:x:{uid}:{gid}:strato container:/root:/bin/sh"),
        ("group", 4, f"strato:x:{gid}:"),
    ):
        try:
            lines = Path("/etc", name).read_text().splitlines()
        except OSError:
            lines = []
        clean = []
        ids = set()
        for line in lines:
            parts = line.split(":")
            if len(parts) != fields or line.startswith(("#", "+", "-")):
                continue
            parts[1] = "x"
            ids.add(parts[2])
            clean.append(":".join(parts))
        if str(uid if name == "passwd" else gid) not in ids:
            clean.append(extra)
        text = "\n".join(clean) + "\n"
        target = out / name
        try:
            if target.read_text() == text:
                continue
        except OSError:
            pass
        tmp = out / f".{name}.{os.getpid()}"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    return out


def interpreter_dirs(argv0: str) -> list[str]:
    """The directories the interpreter needs, each exactly (never a parent): its prefixes
    and base prefixes, the virtual environment of ``argv0`` and the folder its real file is
    in; those under the system directories are left out (the root has them)."""
    exe = os.path.abspath(argv0) if "/" in argv0 else ""
    candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    if exe:
        d = os.path.dirname(exe)
        while d != "/":  # the venv is where pyvenv.cfg is, above the (symlinked) program
            if os.path.exists(os.path.join(d, "pyvenv.cfg")):
                candidates.append(d)
                break
            d = os.path.dirname(d)
        candidates.append(os.path.dirname(os.path.realpath(exe)))
    system = ["/" + d for d in SYSTEM_DIRS] + ["/etc"]
    wanted = set()
    for p in candidates:
        if not p or not os.path.isabs(p):
            continue
        for q in {os.path.normpath(p), os.path.realpath(p)}:
            if os.path.isdir(q) and q != "/" and not _covered(q, system):
                wanted.add(q)
    roots: list[str] = []
    for p in sorted(wanted):  # the outermost of nested directories is enough
        if not any(_covered(p, [r]) for r in roots):
            roots.append(p)
    return roots


def minimal_root(argv0: str, etc_dir: str | os.PathLike[str]) -> list[RootEntry]:
    """The root of a container without an image, as steps in order (see the module's
    doc). ``etc_dir``: from :func:`sanitized_etc`. The runtime adds ``/proc``, ``/dev``,
    ``/run`` and the launch's binds after these."""
    entries: list[RootEntry] = []
    for name in SYSTEM_DIRS:
        host = "/" + name
        if os.path.islink(host):
            entries.append(RootEntry("symlink", os.readlink(host), host))
        elif os.path.isdir(host):
            entries.append(RootEntry("ro", host, host))
    for name in ETC_FILES:
        host = "/etc/" + name
        if not os.path.exists(host):
            continue  # (a dangling link too)
        entries.append(RootEntry("ro", os.path.realpath(host) if not os.path.isdir(host)
                                 else host, host))  # fmt: skip
    for name in ("passwd", "group"):
        entries.append(RootEntry("ro", os.path.join(etc_dir, name), "/etc/" + name))
    entries += [RootEntry("tmpfs", "", d) for d in FRESH_DIRS]
    entries += [RootEntry("ro", d, d) for d in interpreter_dirs(argv0)]
    return entries


def check_launch(launch: ContainerLaunch) -> None:
    """Raise ``InvalidError`` (or ``FileNotFoundError`` for a missing host path) before
    anything is set up."""
    if not launch.argv:
        raise InvalidError(f"container {launch.container_id}: argv is empty.")
    validate_limits(launch.cpu, launch.memory_mb, launch.pids_max)
    for b in launch.binds:
        if not os.path.isabs(b.dst) or not os.path.isabs(b.src):
            raise InvalidError(f"bind {b.src} -> {b.dst}: both paths must be absolute.")
        if not os.path.exists(b.src):
            raise FileNotFoundError(f"bind source {b.src} does not exist")
    if launch.channel_socket is not None and not os.path.exists(launch.channel_socket):
        raise FileNotFoundError(f"channel socket {launch.channel_socket} does not exist")
    if launch.workdir is not None and not os.path.isabs(launch.workdir):
        raise InvalidError(f"workdir {launch.workdir!r} must be an absolute path.")


def _covered(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def minimal_workdir(launch: ContainerLaunch, root: Iterable[RootEntry]) -> str:
    """Where a container with a :func:`minimal_root` starts: ``workdir``, else ``cwd`` where
    the container sees it (under one of its binds), else ``/``."""
    if launch.workdir is not None:
        return launch.workdir
    visible = [e.dst for e in root if e.kind == "ro"] + [
        b.dst for b in launch.binds if b.src == b.dst
    ]
    real = os.path.realpath(launch.cwd)
    for d in visible:
        if real == d or real.startswith(d.rstrip("/") + "/"):
            return real
    return "/"


def let_container_reach(socket_path: str) -> None:
    """The channel socket is bound into the container, whose unprivileged user must be able
    to connect to it: make it read-writable by all (its folder on the host stays private;
    the control plane authenticates every container by its token)."""
    try:
        mode = stat.S_IMODE(os.stat(socket_path).st_mode)
        if mode & 0o006 != 0o006:
            os.chmod(socket_path, mode | 0o666)
    except OSError as exc:
        logging.getLogger("strato.runtime").warning(
            "cannot open the channel socket %s to containers: %s", socket_path, exc
        )


def interpreter_binds(launch: ContainerLaunch, hidden: Iterable[str]) -> list[Bind]:
    """For a root that shows the host's, read-only, but with its own ``/tmp`` and ``/run``
    (and empty ``hidden`` directories): the interpreter's folders (:func:`interpreter_dirs`,
    never other folders of this process's import path) that those cover, to bind back at
    the same paths. (``bwrap`` and ``gvisor`` build a :func:`minimal_root` instead.)"""
    covered = ("/tmp", "/run", *hidden)
    taken = {b.dst for b in launch.binds}
    return [
        Bind(p, p, readonly=True)
        for p in interpreter_dirs(launch.argv[0])
        if _covered(p, covered) and p not in taken
    ]


def host_workdir(launch: ContainerLaunch, hidden: Iterable[str]) -> str:
    """Where a container without an image starts: ``workdir``, else ``cwd`` where the
    container sees it (not under its own /tmp, /run... nor a hidden directory), else /."""
    if launch.workdir is not None:
        return launch.workdir
    cwd = os.path.realpath(launch.cwd)
    for covered in (*OWN_DIRS, *hidden):
        if cwd == covered or cwd.startswith(covered.rstrip("/") + "/"):
            return "/"
    return cwd


def container_environment(launch: ContainerLaunch) -> dict[str, str]:
    """The launch's environment with ``$STRATO_CHANNEL`` pointing at the channel socket's
    place inside the container (``CUDA_VISIBLE_DEVICES`` is the runtime's to set)."""
    env = dict(launch.env)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if launch.channel_socket is not None:
        env[CHANNEL_ENV] = f"unix:{CHANNEL_PATH}"
    return env
