"""Root filesystems for isolating runtimes: an image's layers under a writable layer.

Each container gets a directory ``<state dir>/containers/<container id>/`` holding ``upper/`` (its
writable layer), ``work/`` (overlayfs' scratch space) and ``rootfs/``, where the layers are
mounted as one overlayfs (lowest layer last in ``lowerdir``, as overlayfs wants). Writes go
to ``upper/`` and never reach the layers; the directory is unmounted and deleted when the
container has exited. Mounting needs root (``CAP_SYS_ADMIN``).

The state directory is ``$STRATO_RUNTIME_DIR``, else ``/var/lib/strato/runtime`` for root,
else ``<tmp>/strato-runtime-<uid>``; it must be on a filesystem that can hold an overlayfs
upper layer (ext4, xfs, btrfs, tmpfs; not overlayfs itself).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from strato import settings
from strato.exceptions import InvalidError
from strato.runtime.base import Bind

log = logging.getLogger("strato.runtime")

STATE_DIR_ENV = "STRATO_RUNTIME_DIR"
_MNT_DETACH = 2
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_SYS_MOUNT_SETATTR = 442  # x86_64 and the generic table (arm64) alike
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_OVERLAY_DATA_MAX = 4000  # mount(2) data is one page
_FORBIDDEN_IN_LAYER = (":", ",", "\\")
_SYMLINK_HOPS = 40


class RootfsError(RuntimeError):
    """Preparing a container's root filesystem failed."""


def default_state_dir() -> Path:
    configured = settings.RUNTIME_DIR.get()
    if configured is not None:
        return configured
    if os.geteuid() == 0:
        return Path("/var/lib/strato/runtime")
    return Path(tempfile.gettempdir()) / f"strato-runtime-{os.geteuid()}"


# ---------------------------------------------------------------------------------------
# mount(2) and umount2(2)

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.syscall.restype = ctypes.c_long
    return _libc


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns")]


def _mount(
    source: str | None, target: str | Path, fstype: str | None, flags: int, data: str | None
) -> None:
    enc = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    if _c().mount(enc[0], enc[1], enc[2], flags, enc[3]) != 0:
        err = ctypes.get_errno()
        raise RootfsError(f"cannot mount {source or fstype} on {target}: {os.strerror(err)}")


def _make_readonly(target: Path) -> None:
    """Make the bind mount at ``target`` and everything below it read-only and private (no
    mount events propagate in or out)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, _MS_PRIVATE, 0)
    done = _c().syscall(
        _SYS_MOUNT_SETATTR, -100, os.fsencode(target), _AT_RECURSIVE,
        ctypes.byref(attr), ctypes.sizeof(attr),
    )  # fmt: skip
    if done == 0:
        return
    # Before Linux 5.12: remount each mount of the tree read-only, one by one.
    _mount(None, target, None, _MS_PRIVATE | _MS_REC, None)
    prefix = str(target).rstrip("/") + "/"
    points = [str(target)]
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                points.append(point)
    for point in points:
        _mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)


HOST_VIEW_OWN = ("proc", "dev", "sys", "tmp", "run")
"""Top-level directories a container never takes from the host: the runtime gives its own."""


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].encode().decode("unicode_escape") for line in f}


def ensure_mount_point(path: Path) -> None:
    """Make ``path`` a private mount of its own (a bind onto itself) if it is not one."""
    if str(path) not in _mount_points():
        _mount(str(path), path, None, _MS_BIND, None)
    _mount(None, path, None, _MS_PRIVATE, None)


def mount_host_view(
    target: Path, skip: tuple[str, ...] = HOST_VIEW_OWN, prune: tuple[Path, ...] = ()
) -> None:
    """Build on ``target`` a root showing the host's, read-only: a small tmpfs holding each
    top-level entry of ``/`` bound read-only (recursively), its symlinks, and empty
    directories for ``skip``. Mount points made in it later never touch the host's files.
    ``prune``: mount points (see :func:`ensure_mount_point`) whose copies are detached from
    the view with everything below them, e.g. the state directory holding the views and
    images of other containers. Remove it all with :func:`unmount` (lazily, at once)."""
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    try:
        _mount(None, target, None, _MS_PRIVATE, None)
        for name in sorted(os.listdir("/")):
            host, inside = os.path.join("/", name), target / name
            if name in skip or name == "lost+found":
                continue
            if os.path.islink(host):
                os.symlink(os.readlink(host), inside)
                continue
            if os.path.isdir(host):
                inside.mkdir()
            elif os.path.isfile(host):
                inside.touch()
            else:
                continue
            _mount(host, inside, None, _MS_BIND | _MS_REC, None)
            for pruned in prune:
                if str(pruned).startswith(host + "/"):
                    _c().umount2(os.fsencode(target / str(pruned).lstrip("/")), _MNT_DETACH)
            _make_readonly(inside)
        for name in skip:
            (target / name).mkdir(exist_ok=True)
    except BaseException:
        _c().umount2(os.fsencode(target), _MNT_DETACH)
        raise


def mount_overlay(layers: list[str], upper: Path, work: Path, target: Path) -> None:
    """Mount ``layers`` (bottom first) read-only under the writable ``upper`` on ``target``."""
    for layer in layers:
        if not os.path.isabs(layer) or any(c in layer for c in _FORBIDDEN_IN_LAYER):
            raise InvalidError(
                f"image layer {layer!r} cannot be mounted: give an absolute path without "
                "':', ',' or '\\\\'."
            )
        if not os.path.isdir(layer):
            raise InvalidError(f"image layer {layer!r} is not a directory.")
    lower = ":".join(reversed(layers))
    data = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(data) > _OVERLAY_DATA_MAX:
        raise InvalidError(
            f"the image has too many layers to mount ({len(layers)}; their paths take "
            f"{len(data)} bytes, the kernel takes {_OVERLAY_DATA_MAX}): squash some."
        )
    if _c().mount(b"overlay", os.fsencode(target), b"overlay", 0, data.encode()) != 0:
        err = ctypes.get_errno()
        hint = " (mounting needs root)" if err == errno.EPERM else ""
        raise RootfsError(
            f"cannot mount the image's layers on {target}: {os.strerror(err)}{hint}; the "
            f"writable layer lives in {upper.parent} (set ${STATE_DIR_ENV} to move it off "
            "an overlayfs or other filesystem that cannot hold it)"
        )


def unmount(target: Path) -> bool:
    """Unmount ``target`` (lazily if busy). Whether nothing is mounted there any more."""
    path = os.fsencode(target)
    if _c().umount2(path, _MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
        return True
    log.warning("could not unmount %s: %s", target, os.strerror(ctypes.get_errno() or err))
    return False


# ---------------------------------------------------------------------------------------
# A container's directory


@dataclass
class ContainerDir:
    """``<state dir>/containers/<container id>/``: the writable layer and the mounted root."""

    path: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    def writable_layer(self) -> Path | None:
        """The writable layer over an image, if one was mounted (not a minimal root)."""
        return self.upper if self.upper.is_dir() else None

    @property
    def work(self) -> Path:
        return self.path / "work"

    @classmethod
    def create(cls, state_dir: Path, container_id: str) -> ContainerDir:
        """A fresh directory; a stale one of the same id is unmounted and removed first."""
        found = cls(state_dir / "containers" / container_id)
        if found.path.exists():
            log.warning("removing a stale root filesystem for container %s", container_id)
            found.remove()
        found.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        found.path.mkdir(mode=0o700)
        return found

    def mount(
        self,
        layers: list[str],
        owned: Iterable[str] = (),
        owner: tuple[int, int] | None = None,
        disk_mb: int | None = None,
    ) -> Path:
        """Mount ``layers`` with a fresh writable layer on :attr:`rootfs`; returns it.

        ``owned``: directories inside (e.g. ``/root``, the working directory) that ``owner``
        (uid, gid: the unprivileged user the container runs as) gets to write: they are made
        in the writable layer before mounting, owned by it, so they merge with the image's
        (whose files stay root's, readable as the image made them); their parents are made
        as the image has them. ``disk_mb``: the container's directory (the writable layer
        with it) is first made a tmpfs of that size, so writes past it fail with ``ENOSPC``
        and never reach the host's disk."""
        if disk_mb is not None:
            opts = f"mode=0700,size={disk_mb}m"
            _mount("tmpfs", self.path, "tmpfs", _MS_NOSUID | _MS_NODEV, opts)
        for made in (self.upper, self.work, self.rootfs):
            made.mkdir(exist_ok=True)
        self.upper.chmod(0o755)  # the root directory of the container
        if owner is not None:
            for d in owned:
                _own_in_upper(self.upper, layers, d, owner)
        mount_overlay(layers, self.upper, self.work, self.rootfs)
        return self.rootfs

    def mount_minimal_root(
        self, entries: Iterable[RootEntryLike], bind: Iterable[str] = ()
    ) -> Path:
        """A small tmpfs on :attr:`rootfs` holding the symlinks and empty mount points of
        ``entries`` (:func:`strato.runtime.isolation.minimal_root`): the runtime mounts the
        rest over it (gVisor's binds). ``bind``: the destinations of read-only entries
        bound here instead, recursively and read-only (all of the tree), private. Removed
        with the rest by :meth:`remove` (one lazy unmount). Returns it."""
        self.rootfs.mkdir(exist_ok=True)
        target = self.rootfs
        bound = set(bind)
        _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
        try:
            _mount(None, target, None, _MS_PRIVATE, None)
            for e in sorted(entries, key=lambda e: e.dst in bound):  # (binds last)
                inside = target / e.dst.lstrip("/")
                inside.parent.mkdir(parents=True, exist_ok=True)
                if e.kind == "symlink":
                    os.symlink(e.src, inside)
                elif e.kind == "tmpfs" or os.path.isdir(e.src):
                    inside.mkdir(exist_ok=True)
                else:
                    inside.touch()
                if e.dst in bound:
                    if e.kind != "ro":
                        raise RootfsError(f"{e.dst} is not a read-only entry to bind")
                    _mount(e.src, inside, None, _MS_BIND | _MS_REC, None)
                    _make_readonly(inside)
            for name in HOST_VIEW_OWN:
                (target / name).mkdir(exist_ok=True)
        except BaseException:
            _c().umount2(os.fsencode(target), _MNT_DETACH)
            raise
        return target

    def mount_host_view(self, state_dir: Path) -> Path:
        """Mount a read-only view of the host's root on :attr:`rootfs`, without the mounts
        under ``state_dir`` (the roots of other containers); returns it."""
        self.rootfs.mkdir(exist_ok=True)
        ensure_mount_point(state_dir)
        mount_host_view(self.rootfs, prune=(state_dir,))
        return self.rootfs

    def remove(self) -> None:
        """Unmount and delete everything (the writable layer too). Never raises."""
        if self.rootfs.exists() and not unmount(self.rootfs):
            return  # never delete through a mount: that would delete in the layers
        if self.path.exists() and not unmount(self.path):  # a size-limited one: a tmpfs
            return
        try:
            shutil.rmtree(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)


class RootEntryLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def src(self) -> str: ...
    @property
    def dst(self) -> str: ...


def _own_in_upper(upper: Path, layers: list[str], path: str, owner: tuple[int, int]) -> None:
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    if not parts:
        return
    here = upper
    for i, name in enumerate(parts):
        here = here / name
        last = i == len(parts) - 1
        found = None
        for layer in reversed(layers):  # the topmost layer that has it
            candidate = Path(layer, *parts[: i + 1])
            if os.path.lexists(candidate):
                found = candidate
                break
        if found is not None and not found.is_dir() or found is not None and found.is_symlink():
            return  # a file or a link in the image: leave it as it is
        if not here.exists():
            here.mkdir()
            if found is not None and not last:
                st = found.stat()
                os.chown(here, st.st_uid, st.st_gid)
                here.chmod(stat.S_IMODE(st.st_mode))
            elif not last:
                here.chmod(0o755)
        if last:
            os.chown(here, *owner)
            mode = stat.S_IMODE(found.stat().st_mode) if found is not None else 0o755
            here.chmod(mode | 0o700)


# ---------------------------------------------------------------------------------------
# Paths inside a root


def resolve_in_root(root: str, path: str) -> str | None:
    """The host path of ``path`` as seen inside a container whose root is ``root``, with
    every symlink (absolute ones too) resolved against ``root``; ``None`` if it is missing."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, name)
        if os.path.islink(host):
            hops += 1
            if hops > _SYMLINK_HOPS:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if not os.path.lexists(host):
            return None
        done.append(name)
    return os.path.join(root, *done)


def find_executable(root: str, argv0: str, env: dict[str, str], workdir: str) -> None:
    """Raise ``FileNotFoundError`` unless ``argv0`` would run inside ``root``, as ``exec``
    with ``$PATH`` would find it there."""
    if "/" in argv0:
        candidates = [argv0 if argv0.startswith("/") else os.path.join(workdir, argv0)]
    else:
        candidates = [os.path.join(d or ".", argv0) for d in env.get("PATH", os.defpath).split(":")]
    for candidate in candidates:
        host = resolve_in_root(root, os.path.join(workdir, candidate))
        if host is not None and os.path.isfile(host) and os.access(host, os.X_OK):
            return
    raise FileNotFoundError(errno.ENOENT, "No such executable file in the image", argv0)


HOST_VIEW_WRITABLE = ("/tmp", "/run")
"""Where a container without an image may get mount points that the host does not have."""


def check_host_view_binds(binds: Iterable[Bind]) -> None:
    """Without an image the root is read-only: a bind needs an existing mount point, or one
    under ``/tmp`` or ``/run`` (the container's own tmpfs)."""
    for b in binds:
        dst = os.path.normpath(b.dst)
        if os.path.lexists(dst) or any(dst.startswith(w + "/") for w in HOST_VIEW_WRITABLE):
            continue
        raise InvalidError(
            f"cannot mount {b.src} at {b.dst}: a container without an image has the host's "
            "root, read-only, where no mount point can be made; choose a path that exists on "
            "this machine or one under /tmp or /run, or give the container an image."
        )
