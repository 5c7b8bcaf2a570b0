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

import errno
import hashlib
import logging
import os
import shutil
import stat
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from strato import settings
from strato.cidr import parse_allowlist
from strato.exceptions import InvalidError
from strato.runtime.base import Bind, Capabilities, ContainerLaunch
from strato.runtime.cgroups import validate_limits
from strato.runtime.supervise import C, SupervisedRuntime, open_cgroups

if TYPE_CHECKING:
    from strato.runtime.network import Egress

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
    return settings.CONTAINER_UID.get(), settings.CONTAINER_GID.get()


@dataclass(frozen=True)
class RootEntry:
    """One step of building a minimal root: ``kind`` is ``"ro"`` (bind ``src`` read-only at
    ``dst``), ``"symlink"`` (``dst`` -> ``src``) or ``"tmpfs"`` (a fresh ``dst``)."""

    kind: str
    src: str
    dst: str


_etc_lock = threading.Lock()
_etc_made: dict[str, tuple[tuple, Path]] = {}


def _etc_signature() -> tuple:
    sig: list[tuple] = []
    for name in (*ETC_FILES, "passwd", "group"):
        host = "/etc/" + name
        try:
            st = os.stat(host)  # (what a link points to: resolv.conf may move)
            sig.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append((name, None))
    return (container_ids(), tuple(sig))


def sanitized_etc(state_dir: str | os.PathLike[str]) -> Path:
    """A copy of what a container without an image sees of ``/etc`` (:data:`ETC_FILES`,
    links into ``/usr`` kept as links, others followed), with ``passwd`` and ``group``
    rewritten without password fields (``x``) and with the container's ids present, in
    ``<state dir>/etc/<version>``: bound at ``/etc`` as one mount. Remade when the host's
    files change (checked with a ``stat`` of each, cheap enough for every start); earlier
    versions stay (running containers of this or another worker may hold them; each is a
    few hundred KiB). Readable by everyone (no secrets). A ``resolv.conf`` whose name
    servers are all on the host's loopback (unreachable from a container) names
    slirp4netns' DNS forwarder instead."""
    base = Path(state_dir) / "etc"
    sig = _etc_signature()
    with _etc_lock:
        made = _etc_made.get(str(base))
        if made is not None and made[0] == sig and made[1].is_dir():
            return made[1]
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        version = hashlib.sha256(repr(sig).encode()).hexdigest()[:16]
        out = base / version
        if not out.is_dir():
            tmp = base / f".{version}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o755)
            _fill_etc(tmp)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, out)
            except OSError:  # made meanwhile by another worker of this machine
                shutil.rmtree(tmp, ignore_errors=True)
        _etc_made[str(base)] = (sig, out)
        return out


def _fill_etc(out: Path) -> None:
    for name in ETC_FILES:
        host = Path("/etc", name)
        try:
            if host.is_symlink() and os.path.realpath(host).startswith("/usr/"):
                os.symlink(os.readlink(host), out / name)
            elif host.is_dir():
                shutil.copytree(host, out / name, symlinks=True)
            elif host.is_file():
                shutil.copyfile(host, out / name)
                os.chmod(out / name, 0o644)
        except OSError:
            continue  # unreadable or gone: the container goes without it
    _container_resolv_conf(out / "resolv.conf")
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
        (out / name).write_text("\n".join(clean) + "\n")
        os.chmod(out / name, 0o644)


def _container_resolv_conf(path: Path) -> None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    servers = [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]
    if servers and all(s.startswith("127.") or s == "::1" for s in servers):
        kept = [ln for ln in lines if not ln.startswith("nameserver")]
        path.write_text("\n".join([*kept, "nameserver 10.0.2.3"]) + "\n")  # slirp4netns' DNS


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
    doc). ``etc_dir``: from :func:`sanitized_etc` (call it at each start: it follows the
    host's changes). The runtime adds ``/proc``, ``/dev``,
    ``/run`` and the launch's binds after these."""
    entries: list[RootEntry] = []
    for name in SYSTEM_DIRS:
        host = "/" + name
        if os.path.islink(host):
            entries.append(RootEntry("symlink", os.readlink(host), host))
        elif os.path.isdir(host):
            entries.append(RootEntry("ro", host, host))
    entries.append(RootEntry("ro", str(etc_dir), "/etc"))
    entries += [RootEntry("tmpfs", "", d) for d in FRESH_DIRS]
    entries += [RootEntry("ro", d, d) for d in interpreter_dirs(argv0)]
    return entries


def bound_program(launch: ContainerLaunch) -> bool:
    """Whether the launch's program is a host file bound into the container (the native
    sandbox agent, in the container's folder): its host file is checked here, and the
    root need not have it."""
    argv0 = launch.argv[0]
    for b in launch.binds:
        dst = b.dst.rstrip("/")
        if argv0 == dst or argv0.startswith(dst + "/"):
            src = os.path.join(b.src, argv0[len(dst) + 1 :]) if argv0 != dst else b.src
            if not (os.path.isfile(src) and os.access(src, os.X_OK)):
                raise FileNotFoundError(errno.ENOENT, "No such executable file", src)
            return True
    return False


def check_launch(launch: ContainerLaunch) -> None:
    """Raise ``InvalidError`` (or ``FileNotFoundError`` for a missing host path) before
    anything is set up."""
    if not launch.argv:
        raise InvalidError(f"container {launch.container_id}: argv is empty.")
    validate_limits(launch.cpu, launch.memory_mb, launch.pids_max)
    if launch.disk_mb is not None and (not isinstance(launch.disk_mb, int) or launch.disk_mb < 1):
        raise InvalidError(f"disk_mb={launch.disk_mb!r} is not valid: give a whole number >= 1.")
    if launch.cidr_allowlist is not None:
        parse_allowlist(launch.cidr_allowlist, launch.block_network)
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


def find_tool(given: str | None, name: str, missing: str) -> str:
    """``given``, else ``name`` on the PATH; else raise ``InvalidError(missing)``."""
    found = given or shutil.which(name)
    if found is None:
        raise InvalidError(missing)
    return found


class IsolatingRuntime(SupervisedRuntime[C]):
    """What ``bwrap`` and ``gvisor`` share: a state directory, the container user, the
    prepared ``/etc``, network namespaces with egress made ahead, and the checks."""

    def __init__(
        self,
        use_cgroups: bool,
        cgroup_parent: str,
        state_dir: str | os.PathLike[str] | None,
        hidden_paths: Iterable[str],
        *,
        gpu: bool,
        snapshot: bool,
    ) -> None:
        from strato.runtime.network import default_pool
        from strato.runtime.rootfs import default_state_dir

        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.hidden_paths = [str(self.state_dir), *hidden_paths]
        """Host directories a container must not see (a zygote without an image: empty)."""
        self.user = container_ids()
        """The unprivileged uid and gid containers run as (inside and on the host)."""
        self.etc_dir = str(sanitized_etc(self.state_dir))
        self.nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        self.egress_pool = default_pool()
        self.cgroups, self.cgroup_reason = open_cgroups(use_cgroups, cgroup_parent)
        self.capabilities = Capabilities(
            isolation=True,
            network_control=True,
            cgroups=self.cgroups is not None,
            gpu=gpu,
            snapshot=snapshot,
        )

    def hide(self, path: str) -> None:
        if path not in self.hidden_paths:
            self.hidden_paths.append(path)

    def check(self, launch: ContainerLaunch) -> None:
        check_launch(launch)

    def take_egress(self, launch: ContainerLaunch) -> Egress:
        """A network namespace with egress for ``launch``, restricted to its
        ``cidr_allowlist`` where it has one. Blocking."""
        from strato.runtime.network import restrict

        egress = self.egress_pool.take()
        if launch.cidr_allowlist is not None:
            try:
                restrict(egress.path, launch.cidr_allowlist)
            except BaseException:
                egress.close()
                raise
        return egress

    def in_egress_netns(self, egress: object | None, argv: list[str]) -> list[str]:
        """``argv`` started in the network namespace of ``egress`` (``None``: as it is)."""
        path = getattr(egress, "path", None)
        if path is None:
            return argv
        return [self.nsenter, f"--net={path}", "--", *argv]
