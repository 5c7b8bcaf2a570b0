"""``strato.Sandbox``: a long-lived, isolated container driven from outside (Modal's
``Sandbox``): run commands in it (``exec``), stream their output, feed their stdin, wait
for it, end it.

A sandbox belongs to an app (``App.lookup(name, create_if_missing=True)``, or a running
app; in a container, its own app by default) and ends with it. It runs under gVisor by
default where the control plane has runsc (else bubblewrap); ``runtime="bwrap"`` is the
fast path. A driver that disconnects does not end it: ``Sandbox.from_id`` attaches again.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from strato import exceptions as exc
from strato import settings
from strato.client import session
from strato.protocol import messages as m

from .aio import with_aio
from .tunnel import Tunnel, check_ports

if TYPE_CHECKING:
    from .image import Image
from .container_process import POLL_S, ContainerProcess, StreamReader, StreamWriter, new_exec_id

RUNTIMES = ("gvisor", "bwrap", "process")


def _app_id(app: Any) -> str:
    if app is None:
        if settings.IN_CONTAINER.get() and settings.APP_ID.get():
            return settings.APP_ID.get()
        raise exc.InvalidError(
            "Sandbox.create needs app=: an App.lookup('name', create_if_missing=True) "
            "handle or a running app"
        )
    app_id = getattr(app, "app_id", None)
    if not isinstance(app_id, str) or not app_id:
        raise exc.InvalidError(
            f"app={app!r} is not running: use App.lookup('name', create_if_missing=True), "
            "or create the sandbox inside `with app.run():`"
        )
    return app_id


def _args(what: str, args: Sequence[object]) -> list[str]:
    out = []
    for a in args:
        if not isinstance(a, str):
            raise exc.InvalidError(f"{what}: every argument must be a str, not {a!r}")
        out.append(a)
    return out


def _timeout(name: str, value: float | None, required: bool = False) -> float | None:
    if value is None and not required:
        return None
    if not isinstance(value, (int, float)) or not 1 <= value <= m.MAX_TIMEOUT_S:
        raise exc.InvalidError(f"{name}={value!r}: give seconds from 1 to {m.MAX_TIMEOUT_S}")
    return float(value)


class Sandbox:
    """A sandbox. Make one with ``Sandbox.create``; attach to one with ``from_id`` or
    ``from_name``."""

    def __init__(self, info: m.SandboxInfo) -> None:
        self._info = info
        self.object_id: str = info.sandbox_id
        self._stdout: StreamReader[str] | None = None
        self._stderr: StreamReader[str] | None = None
        self._stdin: StreamWriter | None = None

    def __repr__(self) -> str:
        return f"Sandbox({self.object_id})"

    # the entrypoint's streams (process 1), as Modal's ``sb.stdout``/``sb.stderr``/``sb.stdin``

    @property
    def stdout(self) -> StreamReader[str]:
        if self._stdout is None:
            self._stdout = StreamReader(self.object_id, 1, 1, True)
        return self._stdout

    @property
    def stderr(self) -> StreamReader[str]:
        if self._stderr is None:
            self._stderr = StreamReader(self.object_id, 1, 2, True)
        return self._stderr

    @property
    def stdin(self) -> StreamWriter:
        if self._stdin is None:
            self._stdin = StreamWriter(self.object_id, 1)
        return self._stdin

    # ------------------------------------------------------------------ making one

    @staticmethod
    def create(
        *entrypoint: str,
        app: Any = None,
        image: Any = None,
        timeout: float = 300,
        idle_timeout: float | None = None,
        workdir: str | None = None,
        cpu: float | None = None,
        memory: int | None = None,
        gpu: str | None = None,
        block_network: bool = False,
        ephemeral_disk: int | None = None,
        cidr_allowlist: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        runtime: str | None = None,
        tags: dict[str, str] | None = None,
        secrets: Sequence[Any] | None = None,
        volumes: dict[str, Any] | None = None,
        encrypted_ports: Sequence[int] = (),
        unencrypted_ports: Sequence[int] = (),
    ) -> Sandbox:
        """Start a sandbox. With an ``entrypoint`` it runs that and ends when it exits;
        without one it stays up until ``terminate()``, ``timeout`` (seconds from its
        start) or ``idle_timeout`` (seconds with no process running and no I/O).
        ``ephemeral_disk``: MiB each writable folder may hold (the image's writable layer,
        ``/tmp``...; in memory, counted against ``memory``), else the control plane's
        default. ``cidr_allowlist``: the only address ranges it may reach (DNS aside)."""
        if runtime is not None and runtime not in RUNTIMES:
            raise exc.InvalidError(f"runtime={runtime!r}: use one of {', '.join(RUNTIMES)}")
        if image is not None:
            from .image import Image, upload_image_files

            if not isinstance(image, Image):
                raise exc.InvalidError(f"image={image!r}: use a strato.Image")
        client = session.api()
        if image is not None:
            upload_image_files(client, image)
        refs, mounts = [], []
        if secrets:
            from .secret import check_secrets, secret_refs

            refs = secret_refs(client, check_secrets(secrets, "Sandbox.create(secrets=...)"))
        if volumes:
            from .volume import resolve_mounts, volume_mounts

            mounts = resolve_mounts(client, volume_mounts(volumes))
        if workdir is not None and not workdir.startswith("/"):
            raise exc.InvalidError(f"workdir={workdir!r}: give an absolute path")
        from .options import ephemeral_disk as check_disk

        disk = check_disk(ephemeral_disk)
        allow = list(cidr_allowlist) if cidr_allowlist is not None else None
        if allow is not None:
            from strato.cidr import parse_allowlist

            parse_allowlist(allow, block_network)
        body = m.CreateSandbox(
            app_id=_app_id(app),
            entrypoint=_args("entrypoint", entrypoint),
            image=image.spec if image is not None else None,
            timeout=_timeout("timeout", timeout, True) or 300.0,
            idle_timeout=_timeout("idle_timeout", idle_timeout),
            workdir=workdir,
            cpu=float(cpu) if cpu is not None else None,
            memory_mb=int(memory) if memory is not None else None,
            gpu=[gpu] if gpu else [],
            block_network=bool(block_network),
            ephemeral_disk_mb=disk,
            cidr_allowlist=allow,
            env=dict(env or {}),
            name=name,
            runtime=runtime,  # type: ignore[arg-type]
            tags=dict(tags or {}),
            volumes=mounts,
            secrets=refs,
            encrypted_ports=check_ports("encrypted_ports", encrypted_ports),
            unencrypted_ports=check_ports("unencrypted_ports", unencrypted_ports),
        )
        return Sandbox(client.call("POST", "/sandboxes", body, m.SandboxInfo))

    @staticmethod
    def from_id(sandbox_id: str) -> Sandbox:
        """Attach to a sandbox (one that ended still answers ``poll``/``returncode``)."""
        return Sandbox(session.api().call("GET", f"/sandboxes/{sandbox_id}", None, m.SandboxInfo))

    @staticmethod
    def from_name(app_name: str, name: str) -> Sandbox:
        """The running sandbox called ``name`` in the app ``app_name``."""
        return Sandbox(
            session.api().call("GET", f"/apps/{app_name}/sandboxes/{name}", None, m.SandboxInfo)
        )

    @staticmethod
    def list(*, app_id: str | None = None, tags: dict[str, str] | None = None) -> list[Sandbox]:
        """The running sandboxes (of ``app_id``; with all of ``tags``)."""
        params: dict[str, str] = {}
        if app_id is not None:
            params["app_id"] = app_id
        if tags:
            params["tags"] = json.dumps(tags)
        got = session.api().call("GET", "/sandboxes", None, m.SandboxList, params=params)
        return [Sandbox(i) for i in got.sandboxes]

    # ------------------------------------------------------------------ state

    def _refresh(self, wait: float = 0.0) -> m.SandboxInfo:
        path = f"/sandboxes/{self.object_id}" + ("/wait" if wait else "")
        self._info = session.api().call(
            "GET",
            path,
            None,
            m.SandboxInfo,
            params={"timeout": wait} if wait else None,
            timeout=wait + 30.0,
        )
        return self._info

    @property
    def returncode(self) -> int | None:
        """Its exit code once ended: its entrypoint's, 124 after a timeout, 137 when
        terminated; None while it runs (as of the last ``poll``/``wait``)."""
        return self._info.returncode if self._info.status in _ENDED else None

    @with_aio
    def poll(self) -> int | None:
        """Its exit code if it has ended, else None."""
        self._refresh()
        return self.returncode

    @with_aio
    def wait(self, raise_on_termination: bool = True) -> None:
        """Wait for it to end. Raises ``SandboxTimeoutError`` after a timeout and, with
        ``raise_on_termination``, ``SandboxTerminatedError`` when it was terminated."""
        while self._refresh(POLL_S).status not in _ENDED:
            pass
        info = self._info
        if info.status == "timeout":
            raise exc.SandboxTimeoutError(f"sandbox {self.object_id}: {info.reason}")
        if info.status == "terminated" and raise_on_termination:
            raise exc.SandboxTerminatedError(f"sandbox {self.object_id}: {info.reason}")

    @with_aio
    def terminate(self) -> None:
        """End it (its processes are killed)."""
        self._info = session.api().call(
            "POST", f"/sandboxes/{self.object_id}/terminate", None, m.SandboxInfo
        )

    @with_aio
    def set_tags(self, tags: dict[str, str]) -> None:
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise exc.InvalidError(f"tags={tags!r}: give a dict of str to str")
        self._info = session.api().call(
            "PUT", f"/sandboxes/{self.object_id}/tags", m.SandboxTags(tags), m.SandboxInfo
        )

    @with_aio
    def get_tags(self) -> dict[str, str]:
        return dict(self._refresh().tags)

    @property
    def reason(self) -> str:
        """Why it ended (as of the last ``poll``/``wait``)."""
        return self._info.reason

    # ------------------------------------------------------------------ processes

    @with_aio
    def exec(
        self,
        *cmd: str,
        workdir: str | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        text: bool = True,
        secrets: Sequence[Any] | None = None,
        pty: bool = False,
        pty_size: tuple[int, int] | None = None,
    ) -> ContainerProcess:
        """Start ``cmd`` in the sandbox (waits for the sandbox to be up). A program that
        does not exist exits 127 with the shell's message on its stderr. With ``pty``
        it runs on a terminal of its own (``pty_size``: (columns, rows), else this
        terminal's): its stdout carries everything it writes, its stderr stays empty."""
        if not cmd:
            raise exc.InvalidError("exec() needs a command: sb.exec('python', '-c', '...')")
        refs = []
        if secrets:
            from .secret import check_secrets, secret_refs

            refs = secret_refs(session.api(), check_secrets(secrets, "exec(secrets=...)"))
        size = None
        if pty:
            cols, rows = pty_size or _terminal_size()
            size = m.TerminalSize(rows, cols)
        body = m.ExecRequest(
            argv=_args("exec", cmd),
            exec_id=new_exec_id(),
            workdir=workdir,
            env=dict(env or {}),
            timeout=_timeout("timeout", timeout),
            pty=bool(pty),
            size=size,
            secrets=refs,
        )
        api = session.api()
        deadline = time.monotonic() + 3600.0
        while True:
            got = api.call(
                "POST",
                f"/sandboxes/{self.object_id}/exec",
                body,
                _MaybePid,
                params={"wait": 30.0},
                timeout=60.0,
            )
            if got.pid is not None:
                return ContainerProcess(self.object_id, got.pid, text)
            if time.monotonic() > deadline:  # (every ask waits 30 s on the server)
                raise exc.SandboxTimeoutError(f"sandbox {self.object_id} did not start in 1 h")

    # ------------------------------------------------------------------ tunnels, snapshots

    @with_aio
    def tunnels(self, timeout: float = 50.0) -> dict[int, Tunnel]:
        """Each port of ``encrypted_ports``/``unencrypted_ports`` (of ``create``) -> how
        to reach it from outside (``Tunnel.url``), with ``block_network`` too. They are
        closed when the sandbox ends."""
        got = session.api().call(
            "GET", f"/sandboxes/{self.object_id}/tunnels", None, m.SandboxTunnels, timeout=timeout
        )
        return {t.port: Tunnel.from_info(t) for t in got.tunnels}

    @with_aio
    def snapshot_filesystem(self, timeout: float = 600.0) -> Image:
        """The sandbox's files as a new ``Image`` (its image plus what it wrote), for
        ``Sandbox.create(image=...)`` and ``@app.function(image=...)``. The sandbox must
        have been created with an image."""
        from .image import Image

        got = session.api().call(
            "POST",
            f"/sandboxes/{self.object_id}/snapshot",
            None,
            m.SnapshotImage,
            timeout=timeout + 30.0,
        )
        return Image(list(got.image.steps))

    # ------------------------------------------------------------------ files

    def _file(self, req: m.FileRequest) -> m.FileResult:
        return _file_op(self.object_id, req)

    @with_aio
    def open(self, path: str, mode: str = "r") -> FileIO:
        """A file in the sandbox, as Python's ``open``: ``r``, ``w``, ``a``, ``x``, with
        ``b`` for bytes and ``+`` for both ways; ``read``, ``readline``, iteration by
        line, ``write``, ``seek``, ``tell``, ``flush``, ``close``, a context manager.
        Large files move in 1 MiB chunks (neither side holds them whole)."""
        return FileIO(self.object_id, path, mode)

    @with_aio
    def ls(self, path: str = ".") -> builtins.list[str]:
        """The names in a folder of the sandbox."""
        return list(self._file(m.FileRequest("ls", path)).entries)

    @with_aio
    def mkdir(self, path: str, parents: bool = False) -> None:
        """Make a folder (``parents``: with its parents; no error if it exists)."""
        self._file(m.FileRequest("mkdir", path, recursive=parents))

    @with_aio
    def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a folder (with all it holds when ``recursive``)."""
        self._file(m.FileRequest("rm", path, recursive=recursive))


_FILE_ERRORS: dict[str, type[exc.SandboxFilesystemError]] = {
    "not_found": exc.SandboxFilesystemNotFoundError,
    "permission": exc.SandboxFilesystemPermissionError,
    "is_dir": exc.SandboxFilesystemIsADirectoryError,
    "not_dir": exc.SandboxFilesystemNotADirectoryError,
    "not_empty": exc.SandboxFilesystemDirectoryNotEmptyError,
    "exists": exc.SandboxFilesystemFileExistsError,
}


def _file_op(sandbox_id: str, req: m.FileRequest) -> m.FileResult:
    res: m.FileResult = session.api().call(
        "POST", f"/sandboxes/{sandbox_id}/files", req, m.FileResult, timeout=60.0
    )
    if res.error is not None:
        raise _FILE_ERRORS.get(res.error_kind or "", exc.SandboxFilesystemError)(res.error)
    return res


class FileIO:
    """A file open in a sandbox (``Sandbox.open``). Reads and writes go in chunks of at
    most 1 MiB; writes are buffered up to that and sent by ``flush``/``seek``/``close``."""

    def __init__(self, sandbox_id: str, path: str, mode: str = "r") -> None:
        kinds = [c for c in mode if c in "rwax"]
        if len(kinds) != 1 or any(c not in "rwaxbt+" for c in mode) or len(set(mode)) != len(mode):
            raise exc.InvalidError(f"mode={mode!r}: use r, w, a or x, with b and/or +")
        self._sandbox_id = sandbox_id
        self.name = path
        self.mode = mode
        self._binary = "b" in mode
        kind = kinds[0]
        self._readable = kind == "r" or "+" in mode
        self._writable = kind != "r" or "+" in mode
        self._append = kind == "a"
        self._pos = 0
        self._wbuf = bytearray()
        self._wat = 0  # where the buffered bytes go
        self.closed = False
        if kind == "r":
            st = self._op(m.FileRequest("stat", path))
            if st.is_dir:
                raise exc.SandboxFilesystemIsADirectoryError(f"{path}: is a directory")
        elif kind == "x":
            try:
                self._op(m.FileRequest("stat", path))
            except exc.SandboxFilesystemNotFoundError:
                pass
            else:
                raise exc.SandboxFilesystemFileExistsError(f"{path}: file exists")
            self._op(m.FileRequest("write", path, truncate=True))
        elif kind == "w":
            self._op(m.FileRequest("write", path, truncate=True))
        else:  # a: create if missing, start at the end
            self._pos = self._op(m.FileRequest("write", path, append=True)).size

    def _op(self, req: m.FileRequest) -> m.FileResult:
        return _file_op(self._sandbox_id, req)

    def __repr__(self) -> str:
        return f"<strato FileIO {self.name!r} mode={self.mode!r} in {self._sandbox_id}>"

    def __enter__(self) -> FileIO:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check(self, readable: bool = False, writable: bool = False) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if readable and not self._readable:
            raise exc.InvalidError(f"{self.name} is not open for reading (mode {self.mode!r})")
        if writable and not self._writable:
            raise exc.InvalidError(f"{self.name} is not open for writing (mode {self.mode!r})")

    def _out(self, data: bytes) -> str | bytes:
        return data if self._binary else data.decode("utf-8", errors="replace")

    def _read_bytes(self, n: int) -> bytes:
        """Up to ``n`` bytes (-1: to the end) from the position, in chunks."""
        self.flush()
        parts: list[bytes] = []
        left = n
        while left != 0:
            want = m.SANDBOX_CHUNK if left < 0 else min(left, m.SANDBOX_CHUNK)
            data = self._op(m.FileRequest("read", self.name, offset=self._pos, length=want)).data
            if not data:
                break
            parts.append(data)
            self._pos += len(data)
            if left > 0:
                left -= len(data)
        return b"".join(parts)

    def read(self, n: int = -1) -> str | bytes:
        """Up to ``n`` bytes (text: decoded as UTF-8), or all to the end."""
        self._check(readable=True)
        return self._out(self._read_bytes(n))

    def readline(self) -> str | bytes:
        self._check(readable=True)
        self.flush()
        parts: list[bytes] = []
        while True:
            data = self._op(
                m.FileRequest("read", self.name, offset=self._pos, length=64 << 10)
            ).data
            if not data:
                break
            i = data.find(b"\n")
            if i >= 0:
                parts.append(data[: i + 1])
                self._pos += i + 1
                break
            parts.append(data)
            self._pos += len(data)
        return self._out(b"".join(parts))

    def readlines(self) -> list:
        return list(self)

    def __iter__(self) -> Iterator:
        while line := self.readline():
            yield line

    def write(self, data: str | bytes) -> int:
        self._check(writable=True)
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if isinstance(data, str) == self._binary:
            kind = "bytes" if self._binary else "str"
            raise TypeError(f"write() takes {kind} in mode {self.mode!r}")
        if not self._wbuf:
            self._wat = self._pos
        self._wbuf += raw
        self._pos += len(raw)
        if len(self._wbuf) >= m.SANDBOX_CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.closed or not self._wbuf:
            return
        view = memoryview(bytes(self._wbuf))
        self._wbuf.clear()
        at = self._wat
        while view:
            part = view[: m.SANDBOX_CHUNK]
            res = self._op(
                m.FileRequest("write", self.name, offset=at, data=bytes(part), append=self._append)
            )
            at += len(part)
            view = view[len(part) :]
            if self._append:
                self._pos = res.size

    def seek(self, offset: int, whence: int = 0) -> int:
        self._check()
        self.flush()
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        elif whence == 2:
            pos = self._op(m.FileRequest("stat", self.name)).size + offset
        else:
            raise exc.InvalidError(f"whence={whence!r}: 0, 1 or 2")
        if pos < 0:
            raise exc.InvalidError(f"seek to {pos}: before the start of the file")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check()
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def _terminal_size() -> tuple[int, int]:
    import shutil

    size = shutil.get_terminal_size((80, 24))
    return size.columns, size.lines


class _MaybePid(msgspec.Struct):
    pid: int | None = None


_ENDED = ("success", "failure", "timeout", "terminated")
