"""``Volume``: a persistent, shared filesystem mounted into containers (Modal's
``modal.Volume``).

Consistency (as Modal's): a container sees the volume as of its start or its last
``vol.reload()``; what it writes becomes visible to others at ``vol.commit()`` (and when
the container exits). Concurrent commits of different files both survive; of the same
file, the last commit wins.

Outside containers, ``listdir``/``iterdir``/``read_file`` read the latest version, and
``batch_upload``/``remove_file``/``copy_files`` commit at once.
"""

from __future__ import annotations

import contextlib
import enum
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from strato import exceptions as exc
from strato import settings
from strato.client import session
from strato.client import volumes as cv
from strato.protocol import messages as m
from strato.protocol.volumes import check_name, norm_path

from .aio import with_aio

_FORBIDDEN_MOUNTS = ("/proc", "/sys", "/dev", "/run/strato")
_lock = threading.Lock()  # commits and reloads in this container, one at a time


class FileEntryType(enum.IntEnum):
    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


@dataclass(frozen=True)
class FileEntry:
    """A file or directory of a volume (Modal's ``FileEntry``)."""

    path: str
    type: FileEntryType
    mtime: float
    size: int


class Volume:
    """A named (or ephemeral) volume. Mount it with ``volumes={"/data": vol}``."""

    def __init__(
        self,
        *,
        name: str | None = None,
        volume_id: str | None = None,
        create_if_missing: bool = False,
        read_only: bool = False,
    ) -> None:
        self._name = name
        self._volume_id = volume_id
        self._create_if_missing = create_if_missing
        self._read_only = read_only

    def __repr__(self) -> str:
        ro = ", read_only" if self._read_only else ""
        return f"<strato.Volume {self._name or self._volume_id}{ro}>"

    # ------------------------------------------------------------------ lookup

    @staticmethod
    def from_name(
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
    ) -> Volume:
        """The volume of that name (made on first use with ``create_if_missing``)."""
        check_name(name)
        if not isinstance(create_if_missing, bool):
            raise exc.InvalidError("create_if_missing= must be True or False")
        return Volume(name=name, create_if_missing=create_if_missing)

    @staticmethod
    @contextlib.contextmanager
    def ephemeral() -> Iterator[Volume]:
        """A volume with no name, deleted when the ``with`` block ends."""
        info = session.api().call("POST", "/volumes", m.CreateVolume(None), m.VolumeInfo)
        try:
            yield Volume(volume_id=info.volume_id)
        finally:
            with contextlib.suppress(exc.NotFoundError):
                session.api().call("DELETE", f"/volumes/{info.volume_id}")

    @staticmethod
    def delete(name: str, *, environment_name: str | None = None) -> None:
        """Delete the named volume and its files (containers that mount it can no longer
        commit)."""
        check_name(name)
        session.api().call("DELETE", f"/volumes/{name}")

    def read_only(self) -> Volume:
        """This volume, to be mounted read-only."""
        return Volume(
            name=self._name,
            volume_id=self._volume_id,
            create_if_missing=self._create_if_missing,
            read_only=True,
        )

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def object_id(self) -> str:
        return self.hydrate()._volume_id or ""

    def hydrate(self) -> Volume:
        """Look the volume up (creating it with ``create_if_missing``)."""
        if self._volume_id is None:
            req = m.CreateVolume(self._name, create_if_missing=self._create_if_missing)
            self._volume_id = session.api().call("POST", "/volumes", req, m.VolumeInfo).volume_id
        return self

    def _ref(self) -> str:
        """How the control plane knows it: its id, else its name (made first if asked)."""
        if self._volume_id is None and self._create_if_missing and not _in_container():
            self.hydrate()
        ref = self._volume_id or self._name
        assert ref is not None
        return ref

    @with_aio
    def info(self) -> m.VolumeInfo:
        return session.api().call("GET", f"/volumes/{self._ref()}", None, m.VolumeInfo)

    # ------------------------------------------------------------------ in a container

    def _mounts(self) -> list[cv.MountedVolume]:
        spec = settings.CONTAINER_SPEC.get()
        path = os.path.join(os.path.dirname(spec), "volumes.msgpack") if spec else ""
        if not path or not os.path.exists(path):
            return []
        return [
            v
            for v in cv.read_mounts(path)
            if v.volume_id == self._volume_id or (self._name is not None and v.name == self._name)
        ]

    def _writable_mounts(self, what: str) -> list[cv.MountedVolume]:
        mounts = self._mounts()
        if not mounts:
            raise exc.InvalidError(
                f"{what}() works inside a container that mounts {self!r} "
                "(volumes={'/path': vol}); outside one, use batch_upload, remove_file, "
                "copy_files and read_file"
            )
        rw = [v for v in mounts if not v.read_only]
        if not rw:
            raise exc.InvalidError(
                f"{self!r} is mounted read-only at {mounts[0].path}: it cannot {what}; a "
                "read-only mount shows the version of the container's start"
            )
        return rw

    @with_aio
    def commit(self) -> None:
        """Publish this container's changes to the mounted volume: new, changed and
        deleted files (per file, the last commit wins)."""
        with _lock:
            for v in self._writable_mounts("commit"):
                state = cv.read_state(v.state_file)
                new = cv.commit_tree(session.api(), v.volume_id, v.path, state)
                if new is not state:
                    cv.write_state(v.state_file, new)

    @with_aio
    def reload(self) -> None:
        """See the latest committed version: files others committed appear here; a file
        changed here and not committed is kept as it is."""
        with _lock:
            for v in self._writable_mounts("reload"):
                state = cv.read_state(v.state_file)
                man = session.api().call(
                    "GET",
                    f"/volumes/{v.volume_id}/manifest",
                    None,
                    m.VolumeManifest,
                    timeout=300.0,
                )
                cv.write_state(v.state_file, cv.reload_tree(session.api(), v.path, state, man))

    # ------------------------------------------------------------------ files

    def _manifest(self, path: str) -> m.VolumeManifest:
        prefix = norm_path(path, root_ok=True)
        return session.api().call(
            "GET",
            f"/volumes/{self._ref()}/manifest",
            None,
            m.VolumeManifest,
            params={"prefix": prefix, "data": 0},
            timeout=300.0,
        )

    @with_aio(iterates=True)
    def iterdir(self, path: str = "/", *, recursive: bool = True) -> Iterator[FileEntry]:
        """The files and directories under ``path`` (all levels with ``recursive``)."""
        prefix = norm_path(path, root_ok=True)
        files = self._manifest(prefix).files
        if not files:
            if prefix:
                raise exc.NotFoundError(f"no file or directory {path!r} in {self!r}")
            return
        if len(files) == 1 and files[0].path == prefix:
            f = files[0]
            yield FileEntry(f.path, FileEntryType.FILE, f.mtime, f.size)
            return
        dirs: dict[str, float] = {}
        depth = prefix.count("/") + 1 if prefix else 0
        for f in sorted(files, key=lambda f: f.path):
            parts = f.path.split("/")
            for i in range(depth + 1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs and (recursive or i == depth + 1):
                    dirs[d] = f.mtime
                    yield FileEntry(d, FileEntryType.DIRECTORY, f.mtime, 0)
            if recursive or len(parts) == depth + 1:
                yield FileEntry(f.path, FileEntryType.FILE, f.mtime, f.size)

    @with_aio
    def listdir(self, path: str = "/", *, recursive: bool = False) -> list[FileEntry]:
        """The entries under ``path`` (a list)."""
        return list(self.iterdir(path, recursive=recursive))

    @with_aio(iterates=True)
    def read_file(self, path: str) -> Iterator[bytes]:
        """The file's content, in chunks (streamed: never all in memory)."""
        p = norm_path(path)
        api = session.api()
        f = api.call("GET", f"/volumes/{self._ref()}/file", None, m.VolumeFile, params={"path": p})
        if f.data is not None:  # a small file, kept inline
            yield f.data
        for key in f.blocks:
            yield api.get_blob(key)

    @with_aio
    def read_file_into_fileobj(self, path: str, fileobj: BinaryIO) -> int:
        """Write the file's content into ``fileobj``; the bytes written."""
        n = 0
        for chunk in self.read_file(path):
            fileobj.write(chunk)
            n += len(chunk)
        return n

    @with_aio
    def remove_file(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (a directory and what it holds with ``recursive``)."""
        p = norm_path(path, root_ok=recursive)
        body = (
            m.VolumeCommit(recursive_deletes=[p], missing_ok=False)
            if recursive
            else m.VolumeCommit(deletes=[p], missing_ok=False)
        )
        session.api().call("POST", f"/volumes/{self._ref()}/commit", body, m.VolumeVersion)

    @with_aio
    def copy_files(self, src_paths: list[str], dst_path: str, recursive: bool = False) -> None:
        """Copy files within the volume, as ``cp`` (directories with ``recursive``)."""
        if isinstance(src_paths, str):
            raise exc.InvalidError("copy_files(src_paths=...): pass a list of paths")
        body = m.VolumeCopy([norm_path(p) for p in src_paths], dst_path, recursive)
        norm_path(dst_path, root_ok=True)
        session.api().call("POST", f"/volumes/{self._ref()}/copy", body, m.VolumeVersion)

    def batch_upload(self, force: bool = False) -> _BatchUpload:
        """``with vol.batch_upload() as batch: batch.put_file(...); batch.put_directory(...)``:
        uploads what the control plane lacks and commits it all at the block's end.
        Without ``force``, a file that exists in the volume already is an error."""
        return _BatchUpload(self, force)


class _BatchUpload:
    def __init__(self, volume: Volume, force: bool) -> None:
        self.volume = volume
        self.force = force
        self._files: dict[str, tuple[str, int | None]] = {}  # remote -> (local, mode)
        self._tmp: tempfile.TemporaryDirectory | None = None

    def put_file(
        self, local_file: str | os.PathLike | BinaryIO, remote_path: str, mode: int | None = None
    ) -> None:
        """Upload a local file (a path or a binary file object) to ``remote_path``."""
        remote = norm_path(str(remote_path))
        if isinstance(local_file, str | os.PathLike):
            local = os.fspath(local_file)
            if not os.path.isfile(local):
                raise exc.InvalidError(f"put_file: {local} is not a file")
        else:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="strato-upload-")
            local = os.path.join(self._tmp.name, str(len(self._files)))
            data = local_file.read()
            if not isinstance(data, bytes | bytearray | memoryview):
                raise exc.InvalidError("put_file: pass a path or a file opened in binary mode")
            with open(local, "wb") as out:
                out.write(data)
        self._files[remote] = (local, mode)

    def put_directory(
        self, local_path: str | os.PathLike, remote_path: str, recursive: bool = True
    ) -> None:
        """Upload the files of a local directory under ``remote_path``."""
        root = os.fspath(local_path)
        if not os.path.isdir(root):
            raise exc.InvalidError(f"put_directory: {root} is not a directory")
        base = norm_path(str(remote_path), root_ok=True)
        for dirpath, dirnames, filenames in os.walk(root):
            if not recursive:
                dirnames.clear()
            for fn in filenames:
                local = os.path.join(dirpath, fn)
                if os.path.islink(local) or not os.path.isfile(local):
                    continue
                rel = os.path.relpath(local, root).replace(os.sep, "/")
                self.put_file(local, f"{base}/{rel}" if base else rel)

    def __enter__(self) -> _BatchUpload:
        return self

    def __exit__(self, et, ev, tb) -> None:
        try:
            if et is None:
                self._commit()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    async def __aenter__(self) -> _BatchUpload:
        return self

    async def __aexit__(self, et, ev, tb) -> None:
        import asyncio

        await asyncio.to_thread(self.__exit__, et, ev, tb)

    def _commit(self) -> None:
        if not self._files:
            return
        api = session.api()
        ref = self.volume._ref()
        if not self.force:
            have = {
                f.path
                for f in api.call(
                    "GET",
                    f"/volumes/{ref}/manifest",
                    None,
                    m.VolumeManifest,
                    params={"data": 0},
                    timeout=300.0,
                ).files
            }
            clash = sorted(p for p in self._files if p in have)
            if clash:
                raise FileExistsError(
                    f"{clash[0]} exists in {self.volume!r} already ({len(clash)} file(s)); "
                    "use batch_upload(force=True) to overwrite"
                )
        files = []
        for remote, (local, mode) in self._files.items():
            f = cv.local_file(remote, local)
            if mode is not None:
                f.mode = mode
            files.append(f)
        cv.upload(api, files)
        cv.send_commit(api, ref, files, [])


def _in_container() -> bool:
    return settings.IN_CONTAINER.get()


def volume_mounts(volumes: object) -> list[m.VolumeMount]:
    """``volumes={"/path": vol}`` as the spec carries it, checked."""
    if volumes is None:
        return []
    if not isinstance(volumes, dict):
        raise exc.InvalidError('volumes= must be a dict of mount path to Volume: {"/data": vol}')
    out: list[m.VolumeMount] = []
    paths: list[str] = []
    for path, vol in volumes.items():
        if not isinstance(vol, Volume):
            raise exc.InvalidError(f"volumes[{path!r}] = {vol!r}: use a strato.Volume")
        if not isinstance(path, str) or not path.startswith("/"):
            raise exc.InvalidError(f"volume mount path {path!r}: use an absolute path")
        norm = "/" + norm_path(path, root_ok=True)
        if any(norm == f or norm.startswith(f + "/") for f in _FORBIDDEN_MOUNTS):
            raise exc.InvalidError(f"volume mount path {path!r}: not under {norm.split('/')[1]}")
        if norm == "/":
            raise exc.InvalidError("a volume cannot be mounted at /")
        for other in paths:
            if norm == other or norm.startswith(other + "/") or other.startswith(norm + "/"):
                raise exc.InvalidError(f"volume mount paths {other} and {norm} overlap")
        paths.append(norm)
        out.append(
            m.VolumeMount(
                norm,
                vol._volume_id or "",
                vol._name,
                vol._read_only,
                vol._create_if_missing,
            )
        )
    return out


def hydrate_mounts(api, specs: list[m.FunctionSpec]) -> list[m.FunctionSpec]:
    """The specs with each volume's id filled in (made where ``create_if_missing``); an
    unknown volume is a ``NotFoundError`` before the app starts."""
    import msgspec

    ids: dict[tuple[str | None, bool], str] = {}
    out = []
    for spec in specs:
        if spec.volumes:
            spec = msgspec.structs.replace(spec, volumes=resolve_mounts(api, spec.volumes, ids))
        out.append(spec)
    return out


def resolve_mounts(
    api, mounts: list[m.VolumeMount], ids: dict[tuple[str | None, bool], str] | None = None
) -> list[m.VolumeMount]:
    """``mounts`` with their volume ids (for anything that starts containers with
    volumes: functions, classes, sandboxes)."""
    import msgspec

    ids = {} if ids is None else ids
    out = []
    for v in mounts:
        vid = v.volume_id
        if not vid:
            key = (v.name, v.create_if_missing)
            if key not in ids:
                req = m.CreateVolume(v.name, create_if_missing=v.create_if_missing)
                ids[key] = api.call("POST", "/volumes", req, m.VolumeInfo).volume_id
            vid = ids[key]
        out.append(msgspec.structs.replace(v, volume_id=vid))
    return out


__all__ = ["FileEntry", "FileEntryType", "Volume"]
