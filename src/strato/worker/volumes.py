"""Volumes on a node: each mounted volume's latest version materialised for a container.

Layout under the worker's cache::

    blobs/ab/<sha256>                    blocks, fetched once per node (shared with code mounts)
    volumes/files/ab/<id>                a file of several blocks, put together once per node
    volumes/trees/<volume_id>/<version>  a version's tree of hard links (read-only mounts,
                                         and the lower layer of the process runtime's
                                         writable ones)
    volumes/owned/<uid>.<gid>/           (root only) copies of the node's files owned by
                                         the isolating runtimes' user, made once per node,
                                         and each version's tree of hard links to them:
                                         the lower layer of those runtimes' writable mounts
    volumes/containers/<cid>/<i>         a container's writable mount i (an overlay, or a
                                         copy where no overlay mounts)
    volumes/containers/<cid>/state/      its VolumeState files (the container rewrites them)

A writable mount is an overlay over the version's tree (a write, in place too, copies the
file up into the container's own layer: the node's files are never written); under the
isolating runtimes the tree below and the upper layer belong to the container's
unprivileged user, so it may write what it copies up. Where no overlay mounts (a worker
not running as root), it is a copy. A read-only mount binds the shared tree read-only.
When the container exits, the worker commits what changed in its writable mounts (against
the state the container last committed or reloaded) and removes them.

The ``process`` runtime has no mount namespace of its own: there the container is started
under ``unshare --mount`` with the volumes bound at their paths in that namespace only
(this needs root, and the mount point must exist as a folder on this machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from strato import exceptions as exc
from strato import settings
from strato.client import volumes as cv
from strato.client.api_base import ApiBase
from strato.protocol import messages as m
from strato.protocol.volumes import norm_path
from strato.runtime.base import Bind, ContainerLaunch

from .mounts import blob_path

log = logging.getLogger("strato.worker.volumes")

IN_CONTAINER_STATE = "/run/strato/volstate"


@dataclass
class Prepared:
    """What a container's volumes add to its launch."""

    binds: list[Bind] = field(default_factory=list)  # for isolating runtimes
    argv_prefix: list[str] = field(default_factory=list)  # for the process runtime
    writable: list[tuple[str, str, cv.VolumeState]] = field(default_factory=list)
    """(volume_id, host tree, the state it was made from) of each writable mount."""
    shared: list[str] = field(default_factory=list)  # the shared trees it binds


def _root(cache: Path) -> Path:
    return cache / "volumes"


def container_dir(cache: Path, cid: str) -> Path:
    return _root(cache) / "containers" / cid


def _file_source(cache: Path, api: ApiBase, f: m.VolumeFile, fetched: dict[str, str]) -> str:
    """A node-cached file with ``f``'s content (its one block, or its blocks put together)."""
    if len(f.blocks) == 1:
        return fetched[f.blocks[0]]
    fid = hashlib.sha256(" ".join(f.blocks).encode()).hexdigest() if f.blocks else "0" * 64
    path = _root(cache) / "files" / fid[:2] / fid
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{fid}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for b in f.blocks:
                with open(fetched[b], "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def _node_file(cache: Path, api: ApiBase, f: m.VolumeFile, fetched: dict[str, str]) -> str:
    """A node-cached file with ``f``'s content and mode (the node's blocks are 0444: a file
    of another mode is a copy, made once per node), shared by the trees of every version
    that holds it. Never written after it is made."""
    src = _file_source(cache, api, f, fetched)
    mode = f.mode & 0o777
    if mode == 0o444:
        return src
    path = f"{src}.{mode:o}" if "/files/" in src else None
    if path is None:
        fid = f.blocks[0]
        path = str(_root(cache) / "files" / fid[:2] / f"{fid}.{mode:o}")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def _owned_root(cache: Path, owner: tuple[int, int]) -> Path:
    """Where the files and trees of ``owner`` lie: a folder only root may enter (its files
    are the user's, but no process of that user, in a container or on this machine, may
    reach them other than through an overlay's copy-up)."""
    root = _root(cache) / "owned" / f"{owner[0]}.{owner[1]}"
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(root.parent, 0o700)
        root.mkdir(mode=0o700, exist_ok=True)
    return root


def _owned_file(
    cache: Path, api: ApiBase, f: m.VolumeFile, fetched: dict[str, str], owner: tuple[int, int]
) -> str:
    """A node-cached copy of ``f``'s content with its mode, owned by ``owner`` (the
    isolating runtimes' container user), made once per node and shared by that user's
    trees of every version that holds it. Only ever the lower layer of overlays: never
    written after it is made, and never bound into a container by itself."""
    src = _file_source(cache, api, f, fetched)
    mode = f.mode & 0o777
    fid = os.path.basename(src)
    path = _owned_root(cache, owner) / "files" / fid[:2] / f"{fid}.{mode:o}"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    os.chown(tmp, *owner)
    os.replace(tmp, path)
    return str(path)


def _fetch_missing(cache: Path, api: ApiBase, files: list[m.VolumeFile]) -> dict[str, str]:
    """Every block of ``files`` in the node's blob cache (fetched once); key -> path."""
    sizes = cv.block_sizes(files)
    out, missing = {}, []
    for key in sizes:
        p = blob_path(str(cache), key)
        out[key] = p
        if not os.path.isfile(p):
            missing.append(key)
    made: set[str] = set()
    tag = f".tmp{os.getpid()}-{threading.get_ident()}"  # this thread's own temporary names
    for key, data in cv.fetch_blocks(api, missing, sizes):
        p = out[key]
        folder = os.path.dirname(p)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        tmp = p + tag
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, 0o444)
        finally:
            os.close(fd)
        os.replace(tmp, p)  # whole, or not there: a concurrent fetch of it is harmless
    return out


def _shared_tree(
    cache: Path,
    api: ApiBase,
    man: m.VolumeManifest,
    fetched: dict[str, str],
    owner: tuple[int, int] | None = None,
) -> str:
    """The version's tree of hard links, built once per node: what a read-only mount binds,
    and the lower layer of a writable one where it is an overlay. With ``owner``: a tree
    of that user's own files and folders (the lower layer of the isolating runtimes'
    writable mounts, whose unprivileged user must be able to write what it copies up)."""
    final = _root(cache) / "trees" / man.volume_id / str(man.version)
    if owner is not None:
        final = _owned_root(cache, owner) / man.volume_id / str(man.version)
    if final.is_dir():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{man.version}.", dir=final.parent))
    try:
        made = {str(tmp)}
        for f in man.files:
            dest = f"{tmp}/{norm_path(f.path)}"
            parent = dest.rsplit("/", 1)[0]
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            mode = f.mode & 0o777
            if not f.blocks:  # an empty or inline file
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                try:
                    view = memoryview(f.data or b"")
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fchmod(fd, mode)
                    if owner is not None:
                        os.fchown(fd, *owner)
                finally:
                    os.close(fd)
                continue
            if owner is not None:
                src = _owned_file(cache, api, f, fetched, owner)
            else:
                src = _node_file(cache, api, f, fetched)
            try:
                os.link(src, dest)  # shares the node's file (never written)
                continue
            except OSError:
                pass
            shutil.copyfile(src, dest)
            os.chmod(dest, mode)
            if owner is not None:
                os.chown(dest, *owner)
        for d, _, _ in os.walk(tmp):
            os.chmod(d, 0o755)
            if owner is not None:
                os.chown(d, *owner)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _own_tree(
    cache: Path,
    api: ApiBase,
    man: m.VolumeManifest,
    fetched: dict[str, str],
    dest_root: Path,
    owner: tuple[int, int] | None,
) -> cv.VolumeState:
    """A writable copy of the version for one container; its state."""
    root = str(dest_root)
    os.makedirs(root)
    made = {root}
    files: dict[str, cv.BaseFile] = {}
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for f in man.files:
        rel = norm_path(f.path)
        dest = f"{root}/{rel}"
        parent = dest.rsplit("/", 1)[0]
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        mode = f.mode & 0o777
        if f.blocks:
            shutil.copyfile(_file_source(cache, api, f, fetched), dest)
            os.chmod(dest, mode)
            if owner is not None:
                os.chown(dest, *owner)
            mtime_ns = os.stat(dest).st_mtime_ns
        else:  # an empty or inline file: written here, no blob
            fd = os.open(dest, flags, 0o600)
            try:
                view = memoryview(f.data or b"")
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if owner is not None:
                    os.fchown(fd, *owner)
                mtime_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
        files[rel] = cv.BaseFile(f.size, mode, cv.content_id(f), mtime_ns)
    for d in made:
        os.chmod(d, 0o755)
        if owner is not None:
            os.chown(d, *owner)
    for d, subdirs, _ in os.walk(root):  # folders made by makedirs along the way
        for sd in subdirs:
            full = f"{d}/{sd}"
            if full not in made:
                os.chmod(full, 0o755)
                if owner is not None:
                    os.chown(full, *owner)
    return cv.VolumeState(man.volume_id, man.version, files)


def prepare(
    msg: m.ContainerStart, host_dir: Path, cache: Path, isolated: bool, api: ApiBase | None
) -> Prepared:
    """Materialise the container's volumes; what its launch needs. Writes
    ``volumes.msgpack`` (the mounts as the container sees them) into ``host_dir``."""
    out = Prepared()
    vols = msg.spec.volumes
    if not vols:
        return out
    if api is None:
        raise exc.InvalidError("this worker has no API connection to fetch volumes")
    if not isolated and os.geteuid() != 0:
        raise exc.InvalidError(
            "mounting a volume under the 'process' runtime needs a worker running as root; "
            "use the bwrap or gvisor runtime"
        )
    mine = container_dir(cache, msg.container_id)
    state_dir = mine / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = None
    if isolated and os.geteuid() == 0:
        owner = (settings.CONTAINER_UID.get(), settings.CONTAINER_GID.get())
        os.chown(state_dir, *owner)
    os.chmod(mine, 0o755)
    os.chmod(state_dir, 0o755)
    mounts: list[cv.MountedVolume] = []
    shell: list[str] = []
    for i, v in enumerate(vols):
        ref = v.volume_id or v.name
        if not ref:
            raise exc.InvalidError(f"the volume at {v.path} has neither id nor name")
        if not isolated and not os.path.isdir(v.path):
            raise exc.InvalidError(
                f"the 'process' runtime mounts a volume only at a folder that exists on this "
                f"machine; {v.path} does not: mount it elsewhere or use the bwrap runtime"
            )
        man = api.call("GET", f"/volumes/{ref}/manifest", None, m.VolumeManifest, timeout=300.0)
        fetched = _fetch_missing(cache, api, man.files)
        state_in = (
            (IN_CONTAINER_STATE if isolated else str(state_dir)) + f"/{i}.msgpack"
            if not v.read_only
            else ""
        )
        if v.read_only:
            with _trees_lock:
                src = _shared_tree(cache, api, man, fetched)
                _tree_users[src] = _tree_users.get(src, 0) + 1
            out.shared.append(src)
        else:
            tree = mine / str(i)
            state = None
            if os.geteuid() == 0:  # an overlay over the version's tree (of owner's files)
                state = _overlay(cache, api, man, fetched, mine, i, out, owner)
            if state is None:
                state = _own_tree(cache, api, man, fetched, tree, owner)
            cv.write_state(str(state_dir / f"{i}.msgpack"), state)
            if owner is not None:
                os.chown(state_dir / f"{i}.msgpack", *owner)
            out.writable.append((man.volume_id, str(tree), state))
            src = str(tree)
        mounts.append(cv.MountedVolume(man.volume_id, v.name, v.path, v.read_only, state_in))
        if isolated:
            out.binds.append(Bind(src, v.path, readonly=v.read_only))
        else:
            shell.append(f"mount --bind -- {shlex.quote(src)} {shlex.quote(v.path)}")
            if v.read_only:
                shell.append(f"mount -o remount,bind,ro -- {shlex.quote(v.path)}")
    if isolated:
        out.binds.append(Bind(str(state_dir), IN_CONTAINER_STATE, readonly=False))
    else:
        script = " && ".join([*shell, 'exec "$@"'])
        out.argv_prefix = ["unshare", "--mount", "--propagation", "private", "--"]
        out.argv_prefix += ["sh", "-c", script, "strato-volumes"]
    cv.write_mounts(str(host_dir / "volumes.msgpack"), mounts)
    os.chmod(host_dir / "volumes.msgpack", 0o644)
    return out


def _overlay(
    cache: Path,
    api: ApiBase,
    man: m.VolumeManifest,
    fetched: dict[str, str],
    mine: Path,
    i: int,
    out: Prepared,
    owner: tuple[int, int] | None = None,
) -> cv.VolumeState | None:
    """Mount ``mine/i`` as an overlay: the version's shared tree below, the container's
    own upper layer above (a write copies a file up: the tree below is never changed);
    its state. None where the overlay cannot be mounted (then the tree is copied).
    With ``owner`` (the isolating runtimes' unprivileged user), the tree below and the
    upper layer are that user's, so what it copies up stays writable by it."""
    with _trees_lock:
        lower = _shared_tree(cache, api, man, fetched, owner)
        _tree_users[lower] = _tree_users.get(lower, 0) + 1
    merged, upper, work = (str(mine / f"{i}{x}") for x in ("", ".upper", ".work"))
    for d in (merged, upper, work):
        os.makedirs(d)
    if owner is not None:
        os.chown(upper, *owner)
        os.chmod(upper, 0o755)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    done = None
    if not any(c in d for d in (lower, upper, work) for c in ",:\\\n"):  # unquotable
        done = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, merged],
            capture_output=True,
            text=True,
        )
    if done is None or done.returncode != 0:
        log.warning("no overlay for a volume (%s): copying it", done and done.stderr.strip())
        _release_trees([lower])
        for d in (merged, upper, work):
            shutil.rmtree(d, ignore_errors=True)
        return None
    out.shared.append(lower)
    _MOUNTED.setdefault(mine.name, []).append(merged)
    files: dict[str, cv.BaseFile] = {}
    for f in man.files:
        rel = norm_path(f.path)
        mtime_ns = os.stat(f"{lower}/{rel}").st_mtime_ns
        files[rel] = cv.BaseFile(f.size, f.mode & 0o777, cv.content_id(f), mtime_ns)
    return cv.VolumeState(man.volume_id, man.version, files)


def _remove(cache: Path, cid: str) -> None:
    """Unmount the container's overlays, then remove its copies (an overlay that would not
    unmount is left in place, said in the log)."""
    stuck = False
    for merged in _MOUNTED.pop(cid, []):
        done = subprocess.run(["umount", merged], capture_output=True, text=True)
        if done.returncode != 0:
            done = subprocess.run(["umount", "-l", merged], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("cannot unmount %s: %s", merged, done.stderr.strip())
            stuck = True
    if not stuck:
        shutil.rmtree(container_dir(cache, cid), ignore_errors=True)


def sweep_leftovers(cache: Path) -> int:
    """Unmount and remove the writable mounts an earlier agent on this cache left behind
    (it was killed before its containers' exits were handled). Call it once at agent start,
    holding ``agent_lock``: no container of this cache runs yet. The number unmounted."""
    root = _root(cache) / "containers"
    if not root.is_dir():
        return 0
    prefix = f"{root}/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            points = [ln.split()[4] for ln in f if len(ln.split()) > 4]
    except OSError:
        points = []
    # mountinfo escapes blanks as octal (\040); our paths have none (see _overlay)
    stale = sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)
    for merged in stale:
        done = subprocess.run(["umount", "-l", merged], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("cannot unmount the leftover %s: %s", merged, done.stderr.strip())
    if stale:
        log.info("unmounted %d volume overlays an earlier agent left behind", len(stale))
    for d in root.iterdir():
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


MAX_STATE_BYTES = 1 << 30


def _container_state(path: str) -> cv.VolumeState | None:
    """The state the container last wrote (its file: untrusted, never followed through a
    link, bounded); None where it is unusable (then the start's state is compared)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_STATE_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return msgspec.msgpack.decode(f.read(), type=cv.VolumeState)
    except (OSError, msgspec.DecodeError):
        return None
    finally:
        os.close(fd)


def commit_at_exit(cache: Path, cid: str, api: ApiBase | None, prepared: Prepared) -> list[str]:
    """Commit what changed in the container's writable mounts, then remove its copies;
    a line per volume committed or failed (for the app's logs)."""
    lines: list[str] = []
    try:
        for i, (volume_id, tree, first) in enumerate(prepared.writable):
            state = first
            sf = container_dir(cache, cid) / "state" / f"{i}.msgpack"
            last = _container_state(str(sf))
            if last is not None and last.volume_id == volume_id:
                state = last
            if api is None:
                continue
            try:
                new = cv.commit_tree(api, volume_id, tree, state)
                if new is not state:
                    lines.append(f"volume {volume_id}: committed at exit (version {new.version})")
            except Exception as e:  # noqa: BLE001 - reported in the app's logs
                log.warning("commit of volume %s at the exit of %s failed: %s", volume_id, cid, e)
                lines.append(f"volume {volume_id}: commit at exit failed: {e}")
    finally:
        _remove(cache, cid)
    return lines


# the containers of this worker with volumes: what their launch prepared
_PREPARED: dict[str, Prepared] = {}
# shared (read-only) trees: how many containers bind each; one no container binds is
# removed once a newer version of its volume is on the node
_tree_users: dict[str, int] = {}
_MOUNTED: dict[str, list[str]] = {}  # container id -> its overlays mounted on this node
_trees_lock = threading.Lock()


def _release_trees(trees: list[str]) -> None:
    with _trees_lock:
        for t in trees:
            _tree_users[t] = _tree_users.get(t, 1) - 1
        for t in trees:
            if _tree_users.get(t, 0) > 0:
                continue
            versions = Path(t).parent
            newest = max((int(v.name) for v in versions.iterdir() if v.name.isdigit()), default=-1)
            if int(Path(t).name) < newest:
                _tree_users.pop(t, None)
                shutil.rmtree(t, ignore_errors=True)
            # older versions nobody binds (left by containers of an earlier agent)
            for v in versions.iterdir():
                old = str(v)
                if v.name.isdigit() and int(v.name) < newest and not _tree_users.get(old):
                    shutil.rmtree(old, ignore_errors=True)


def add_to_launch(
    cache: Path, msg: m.ContainerStart, launch: ContainerLaunch, isolated: bool, api: ApiBase | None
) -> ContainerLaunch:
    """``launch`` with the container's volumes mounted (unchanged without volumes)."""
    if not msg.spec.volumes:
        return launch
    host_dir = Path(launch.cwd)  # the container's folder, beside its spec
    try:
        prepared = prepare(msg, host_dir, cache, isolated, api)
    except BaseException:
        _remove(cache, msg.container_id)
        raise
    _PREPARED[msg.container_id] = prepared
    return dataclasses.replace(
        launch,
        binds=[*launch.binds, *prepared.binds],
        argv=[*prepared.argv_prefix, *launch.argv],
    )


def finish(cache: Path, cid: str, api: ApiBase | None, *, commit: bool = True) -> list[str]:
    """The container has exited (or never started): commit its writable mounts (unless
    ``commit`` is false) and remove them. Lines for the app's logs."""
    prepared = _PREPARED.pop(cid, None)
    if prepared is None:
        return []
    _release_trees(prepared.shared)
    if not commit:
        _remove(cache, cid)
        return []
    return commit_at_exit(cache, cid, api, prepared)
