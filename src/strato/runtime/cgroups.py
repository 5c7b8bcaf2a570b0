"""A small cgroup manager for containers: CPU, memory and PID limits, OOM detection, cleanup.

Works on cgroup v1 (one hierarchy per controller: ``<memory mount>/strato/<id>``,
``<cpu mount>/strato/<id>``, ``<pids mount>/strato/<id>``) and on cgroup v2 (one unified
hierarchy: ``<mount>/strato/<id>``, controllers enabled in the parents' ``subtree_control``).
Mounts are read from ``/proc/self/mountinfo``. A hybrid host (v1 controllers plus an empty
``unified`` v2 mount) is driven as v1: v2 is used only where it holds the memory controller.

Everything here is synchronous and quick except :meth:`ContainerCgroup.kill_all` and
:meth:`ContainerCgroup.remove`, which poll for up to their timeout; call those from a thread
in async code.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from strato.exceptions import InvalidError

log = logging.getLogger("strato.runtime")

MOUNTINFO = "/proc/self/mountinfo"
CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
_UNLIMITED_BYTES = 1 << 62  # v1 prints "unlimited" as a number near 2**63
# Polling for a cgroup to empty: processes that were just killed (or a PID namespace being
# torn down) leave within a millisecond or so; start short, back off to 5 ms.
_FIRST_PAUSE_S = 0.0002
_MAX_PAUSE_S = 0.005
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CgroupUnavailable(Exception):
    """Cgroups cannot be used here; the message says why, for a log line."""


class CgroupError(RuntimeError):
    """Creating or configuring a container's cgroup failed."""


# ---------------------------------------------------------------------------------------
# Mounts


@dataclass(frozen=True)
class CgroupMount:
    point: Path
    """Where the hierarchy is mounted."""
    root: str
    """Which cgroup of the hierarchy appears at ``point`` (``/`` unless namespaced)."""


@dataclass(frozen=True)
class CgroupMounts:
    v1: dict[str, CgroupMount]
    """v1 controller name -> its hierarchy's mount."""
    v2: CgroupMount | None
    """The unified (v2) hierarchy, if mounted."""


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> CgroupMounts:
    """Find the cgroup hierarchies in the text of ``/proc/<pid>/mountinfo``."""
    v1: dict[str, CgroupMount] = {}
    v2: CgroupMount | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount = CgroupMount(Path(_unescape(fields[4])), _unescape(fields[3]))
        if tail[0] == "cgroup2" and v2 is None:
            v2 = mount
        elif tail[0] == "cgroup":
            for option in tail[2].split(","):
                if option in CONTROLLERS and option not in v1:
                    v1[option] = mount
    return CgroupMounts(v1=v1, v2=v2)


def read_mounts(path: str = MOUNTINFO) -> CgroupMounts:
    try:
        return parse_mountinfo(Path(path).read_text())
    except OSError:
        return CgroupMounts(v1={}, v2=None)


def _v2_controllers(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _own_dirs(mounts: CgroupMounts, proc_cgroup: str = "/proc/self/cgroup") -> dict[str, Path]:
    """This process's cgroup directory per controller (``"unified"`` for v2)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, Path] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, cg_path = parts
        if names == "" and mounts.v2 is not None:
            found["unified"] = _under_mount(mounts.v2, cg_path)
        for name in names.split(","):
            if name in mounts.v1:
                found[name] = _under_mount(mounts.v1[name], cg_path)
    return found


def _under_mount(mount: CgroupMount, cg_path: str) -> Path:
    root = mount.root.rstrip("/")
    if cg_path == root or cg_path.startswith(root + "/"):
        relative = cg_path[len(root) :].lstrip("/")
        return mount.point / relative if relative else mount.point
    return mount.point  # outside the mounted subtree (e.g. a cgroup namespace): best effort


def _ancestry(directory: Path, stop: Path) -> list[Path]:
    chain = [directory]
    while directory != stop and directory.parent != directory and stop in directory.parents:
        directory = directory.parent
        chain.append(directory)
    return chain


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def own_limits(mounts: CgroupMounts | None = None) -> tuple[float | None, int | None]:
    """The CPU quota (cores) and memory limit (bytes) on this process's cgroups, if any.

    The tightest limit along the path from this process's cgroup up to the mount wins.
    """
    mounts = mounts or read_mounts()
    own = _own_dirs(mounts)
    cpus: list[float] = []
    memory: list[int] = []
    if "unified" in own and mounts.v2 is not None:
        for d in _ancestry(own["unified"], mounts.v2.point):
            cpu_max = (_read(d / "cpu.max") or "max").split()
            if len(cpu_max) == 2 and cpu_max[0] != "max" and int(cpu_max[1]) > 0:
                cpus.append(int(cpu_max[0]) / int(cpu_max[1]))
            mem_max = _read(d / "memory.max")
            if mem_max and mem_max != "max":
                memory.append(int(mem_max))
    if "cpu" in own:
        for d in _ancestry(own["cpu"], mounts.v1["cpu"].point):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0 and int(period) > 0:
                cpus.append(int(quota) / int(period))
    if "memory" in own:
        for d in _ancestry(own["memory"], mounts.v1["memory"].point):
            limit = _read(d / "memory.limit_in_bytes")
            if limit and int(limit) < _UNLIMITED_BYTES:
                memory.append(int(limit))
    return (min(cpus) if cpus else None, min(memory) if memory else None)


# ---------------------------------------------------------------------------------------
# Files


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _counter(path: Path, key: str) -> int:
    """Value of ``key`` in a flat-keyed file such as ``memory.events``; 0 if absent."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


# ---------------------------------------------------------------------------------------
# One container's cgroup


class ContainerCgroup:
    """The cgroup(s) of one container: one directory on v2, one per controller on v1."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs
        """Controller -> directory on v1; ``{"unified": dir}`` on v2."""
        self._removed = False

    @property
    def procs_paths(self) -> list[str]:
        """The ``cgroup.procs`` files a process must be written into to join."""
        return [str(d / "cgroup.procs") for d in self._unique_dirs()]

    def join_self_shell(self) -> str:
        """A ``sh`` command that moves the shell itself into this cgroup (then ``exec``).

        On v1 it writes ``0`` ("this thread") to each hierarchy's ``tasks``: the shell is
        single-threaded, so that moves the whole process, and since Linux 6.0 moving only
        the calling thread skips the global ``cgroup_threadgroup_rwsem`` write lock, whose
        RCU grace period otherwise costs 5-15 ms per container start on a busy machine. On
        v2 (no ``tasks`` file outside threaded subtrees) it writes ``$$`` to
        ``cgroup.procs``.
        """
        if self.version == 1:
            targets = [(d / "tasks", "0") for d in self._unique_dirs()]
        else:
            targets = [(d / "cgroup.procs", "$$") for d in self._unique_dirs()]
        return " && ".join(f"echo {value} > {shlex.quote(str(path))}" for path, value in targets)

    @property
    def path(self) -> Path:
        """The main directory: the unified one on v2, the memory one on v1."""
        return self.dirs.get("unified") or self.dirs.get("memory") or next(iter(self.dirs.values()))

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` into this cgroup (every hierarchy on v1)."""
        for procs in self.procs_paths:
            _write(Path(procs), str(pid))

    def pids(self) -> set[int]:
        """The processes now in the cgroup, across its hierarchies."""
        found: set[int] = set()
        for d in self._unique_dirs():
            for line in (_read(d / "cgroup.procs") or "").split():
                if line.isdigit():
                    found.add(int(line))
        return found

    def oom_killed(self, killed_by_sigkill: bool = True) -> bool:
        """Whether the kernel's OOM killer killed a process of this cgroup.

        v2 reads ``memory.events``; v1 reads ``oom_kill`` in ``memory.oom_control``
        (kernel 4.13+), or else falls back to ``memory.failcnt > 0`` together with the main
        process having died of SIGKILL.
        """
        if self.version == 2:
            return _counter(self.path / "memory.events", "oom_kill") > 0
        memory = self.dirs.get("memory")
        if memory is None:
            return False
        control = _read(memory / "memory.oom_control") or ""
        if "oom_kill " in control:
            return _counter(memory / "memory.oom_control", "oom_kill") > 0
        failcnt = _read(memory / "memory.failcnt") or "0"
        return killed_by_sigkill and failcnt.isdigit() and int(failcnt) > 0

    def kill_all(self, timeout_s: float = 2.0) -> bool:
        """SIGKILL every process in the cgroup and wait until it is empty.

        Uses ``cgroup.kill`` where the kernel has it (v2, 5.14+); otherwise kills the listed
        pids until none are left (a pid that exits and is reused between the read and the
        kill is the accepted race, as in runc without a freezer). ``timeout_s=0`` makes one
        pass without waiting. Returns whether the cgroup is empty. Never raises.
        """
        deadline = time.monotonic() + timeout_s
        pause = _FIRST_PAUSE_S
        kill_file = self.path / "cgroup.kill"
        use_kill_file = self.version == 2 and kill_file.exists()
        while True:
            try:
                pids = self.pids()
                if not pids:
                    return True
                if use_kill_file:
                    _write(kill_file, "1")
                else:
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            except (OSError, CgroupError) as exc:
                log.debug("killing the processes of cgroup %s: %s", self.path, exc)
            if time.monotonic() >= deadline:
                return not self.pids()
            time.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE_S)

    def remove(self, timeout_s: float = 2.0) -> bool:
        """Remove the directories, retrying while they empty out. Never raises.

        Returns whether all are gone; logs a warning if not.
        """
        if self._removed:
            return True
        deadline = time.monotonic() + timeout_s
        pause = _FIRST_PAUSE_S
        left = self._unique_dirs()
        while True:
            still: list[Path] = []
            for d in left:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    still.append(d)
            left = still
            if not left:
                self._removed = True
                return True
            if time.monotonic() >= deadline:
                log.warning("could not remove cgroup %s: still in use", ", ".join(map(str, left)))
                return False
            time.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE_S)


# ---------------------------------------------------------------------------------------
# Managers


def validate_limits(cpu: float | None, memory_mb: int | None, pids_max: int | None) -> None:
    if cpu is not None and not cpu > 0:
        raise InvalidError(f"cpu={cpu!r} is not valid: give a number of cores above 0.")
    if memory_mb is not None and (not isinstance(memory_mb, int) or memory_mb < 1):
        raise InvalidError(f"memory_mb={memory_mb!r} is not valid: give a whole number >= 1.")
    if pids_max is not None and (not isinstance(pids_max, int) or pids_max < 1):
        raise InvalidError(f"pids_max={pids_max!r} is not valid: give a whole number >= 1.")


def _check_id(container_id: str) -> None:
    if not _ID_RE.fullmatch(container_id):
        raise InvalidError(
            f"container id {container_id!r} cannot name a cgroup: use 1-128 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit."
        )


class CgroupManager:
    """Creates container cgroups under ``<hierarchy>/<parent>``."""

    version: int
    controllers: tuple[str, ...]

    def __init__(self, parents: dict[str, Path]) -> None:
        self.parents = parents
        """Controller (or ``"unified"``) -> the directory containers are created in."""

    def describe(self) -> str:
        return f"cgroup v{self.version} ({', '.join(self.controllers)})"

    def leftover(self, container_id: str) -> ContainerCgroup | None:
        """The cgroup of ``container_id`` where one is left (of an earlier worker)."""
        dirs = {name: Path(parent) / container_id for name, parent in self.parents.items()}
        if not any(d.exists() for d in dirs.values()):
            return None
        return ContainerCgroup(self.version, dirs)

    def create(
        self,
        container_id: str,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids_max: int | None = None,
        cpu_request: float | None = None,
    ) -> ContainerCgroup:
        """Create the container's cgroup with these limits (``cpu_request``: its CPU weight,
        see :func:`cpu_weight`); an old one of that id is removed."""
        _check_id(container_id)
        validate_limits(cpu, memory_mb, pids_max)
        if cpu_request is not None and not cpu_request > 0:
            raise InvalidError(f"cpu_request={cpu_request!r}: give a number of cores above 0.")
        dirs = {name: parent / container_id for name, parent in self.parents.items()}
        group = ContainerCgroup(self.version, dirs)
        if any(d.exists() for d in dirs.values()):
            log.warning("removing a stale cgroup for container %s", container_id)
            group.kill_all()
            group.remove()
            group = ContainerCgroup(self.version, dirs)
        try:
            for d in group._unique_dirs():
                d.mkdir()
            self._configure(group, cpu, memory_mb, pids_max)
            if cpu_request is not None:
                self._weigh(group, cpu_request)
        except (OSError, CgroupError) as exc:
            group.remove(timeout_s=0.5)
            if isinstance(exc, CgroupError):
                raise
            raise CgroupError(f"cannot create cgroup {exc.filename}: {exc.strerror}") from exc
        return group

    def _configure(
        self, group: ContainerCgroup, cpu: float | None, memory_mb: int | None, pids: int | None
    ) -> None:
        raise NotImplementedError

    def _weigh(self, group: ContainerCgroup, cores: float) -> None:
        raise NotImplementedError


def cpu_weight(cores: float, version: int) -> int:
    """The CPU weight of a container that reserved ``cores``: the kernel's default weight
    (v1 ``cpu.shares`` 1024, v2 ``cpu.weight`` 100) per core, never below that default
    (a container that reserved little, like an idle sandbox's 1/64 core, gets as much as
    one that reserved nothing, like a zygote), at most the kernel's maximum. Siblings under
    contention get CPU in proportion to it, whatever their number of threads: a container
    spinning on every core cannot starve its neighbours."""
    cores = max(cores, 1.0)
    if version == 1:
        return min(262_144, round(cores * 1024))
    return min(10_000, round(cores * 100))


def _cpu_quota(cpu: float) -> int:
    return max(1000, round(cpu * CPU_PERIOD_US))


def _warn_missing(controller: str) -> None:
    log.warning("the %s cgroup controller is not available: its limit is not enforced", controller)


class CgroupV1Manager(CgroupManager):
    version = 1

    def __init__(self, parents: dict[str, Path]) -> None:
        super().__init__(parents)
        self.controllers = tuple(parents)

    def _configure(
        self, group: ContainerCgroup, cpu: float | None, memory_mb: int | None, pids: int | None
    ) -> None:
        d = group.dirs
        if memory_mb is not None:
            limit = str(memory_mb * 1024 * 1024)
            _write(d["memory"] / "memory.limit_in_bytes", limit)
            if (d["memory"] / "memory.memsw.limit_in_bytes").exists():
                # memory+swap capped at the same value: swap cannot hide an OOM.
                _write(d["memory"] / "memory.memsw.limit_in_bytes", limit)
            else:
                try:
                    _write(d["memory"] / "memory.swappiness", "0")
                except CgroupError as exc:
                    log.debug("%s", exc)
        if cpu is not None:
            if "cpu" in d:
                _write(d["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d["cpu"] / "cpu.cfs_quota_us", str(_cpu_quota(cpu)))
            else:
                _warn_missing("cpu")
        if pids is not None:
            if "pids" in d:
                _write(d["pids"] / "pids.max", str(pids))
            else:
                _warn_missing("pids")

    def _weigh(self, group: ContainerCgroup, cores: float) -> None:
        if "cpu" in group.dirs:
            _write(group.dirs["cpu"] / "cpu.shares", str(cpu_weight(cores, 1)))


class CgroupV2Manager(CgroupManager):
    version = 2

    def __init__(self, parent: Path) -> None:
        super().__init__({"unified": parent})
        self.controllers = tuple(c for c in CONTROLLERS if c in _v2_controllers(parent))

    def _configure(
        self, group: ContainerCgroup, cpu: float | None, memory_mb: int | None, pids: int | None
    ) -> None:
        d = group.path
        if memory_mb is not None:
            _write(d / "memory.max", str(memory_mb * 1024 * 1024))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
        if (d / "memory.oom.group").exists():
            _write(d / "memory.oom.group", "1")  # an OOM kill takes the whole container
        if cpu is not None:
            if "cpu" in self.controllers:
                _write(d / "cpu.max", f"{_cpu_quota(cpu)} {CPU_PERIOD_US}")
            else:
                _warn_missing("cpu")
        if pids is not None:
            if "pids" in self.controllers:
                _write(d / "pids.max", str(pids))
            else:
                _warn_missing("pids")

    def _weigh(self, group: ContainerCgroup, cores: float) -> None:
        if "cpu" in self.controllers:
            _write(group.path / "cpu.weight", str(cpu_weight(cores, 2)))


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except PermissionError as exc:
        who = "" if os.geteuid() == 0 else " (not running as root)"
        raise CgroupUnavailable(f"{path} cannot be created: permission denied{who}") from exc
    except OSError as exc:
        raise CgroupUnavailable(f"{path} cannot be created: {exc.strerror}") from exc


def _enable_v2(directory: Path, wanted: list[str]) -> None:
    enabled = set((_read(directory / "cgroup.subtree_control") or "").split())
    for controller in wanted:
        if controller in enabled:
            continue
        try:
            _write(directory / "cgroup.subtree_control", f"+{controller}")
        except CgroupError as exc:
            raise CgroupUnavailable(
                f"{exc} (a cgroup v2 directory that holds processes cannot delegate "
                "controllers: run the worker in a leaf cgroup of its own)"
            ) from exc


def open_manager(parent: str = "strato", mounts: CgroupMounts | None = None) -> CgroupManager:
    """Prepare ``<hierarchy>/<parent>`` and return a manager; :class:`CgroupUnavailable` if not."""
    mounts = mounts or read_mounts()
    if mounts.v2 is not None and "memory" in _v2_controllers(mounts.v2.point):
        root = mounts.v2.point
        wanted = [c for c in CONTROLLERS if c in _v2_controllers(root)]
        _enable_v2(root, wanted)
        _make_dir(root / parent)
        _enable_v2(root / parent, wanted)
        return CgroupV2Manager(root / parent)
    if "memory" in mounts.v1:
        parents: dict[str, Path] = {}
        for controller, mount in mounts.v1.items():
            _make_dir(mount.point / parent)
            parents[controller] = mount.point / parent
        return CgroupV1Manager({c: parents[c] for c in CONTROLLERS if c in parents})
    raise CgroupUnavailable("no cgroup hierarchy with the memory controller is mounted")


_last_reason: str | None = None


def detect(parent: str = "strato") -> CgroupManager | None:
    """A manager, or ``None`` when cgroups are unusable (see :func:`detect_reason`)."""
    global _last_reason
    try:
        manager = open_manager(parent)
    except CgroupUnavailable as exc:
        _last_reason = str(exc)
        return None
    _last_reason = None
    return manager


def detect_reason() -> str | None:
    """Why the last :func:`detect` returned ``None``."""
    return _last_reason
