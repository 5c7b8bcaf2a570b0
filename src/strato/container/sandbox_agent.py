"""The agent inside a sandbox's container: it keeps the channel to the control plane and
runs the processes the sandbox's driver asks for (``sb.exec``).

Each process is a plain subprocess in a session of its own (``start_new_session``: a
timeout or ``terminate()`` kills its whole group), with pipes for stdin, stdout and
stderr. One output thread waits on every process's pipes at once and sends what it reads
in one ``SbOutput`` frame per wake-up (so a burst of small writes is one frame); a
stream the control plane has paused (``SbFlow``: it holds as much unread output as it
will) is not read, so its process blocks on its own writes. Each process has a waiter
thread that sends its ``SbExit`` after its output (and kills it at its timeout); stdin is
written by a thread per process, so a process that does not read cannot stall the channel.

The sandbox's processes run as the agent's user, so the agent makes itself non-dumpable
(its memory and environment are not readable through ``/proc``) and passes none of its
own ``STRATO_*`` variables on. The control plane trusts none of its frames anyway.

With an entrypoint the agent starts it as process 1 and exits with its code when it ends.

A sandbox's container runs it alone (:mod:`strato.container.sandbox_entry`), not the
function runner: under gVisor every module imported costs a few milliseconds of the
sandbox's start, so it imports only what it uses - no msgspec: its frames go through
:mod:`strato.container.sandbox_wire`, byte for byte msgspec's encoding of the same messages.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading

from strato import settings
from strato.container import sandbox_wire as m
from strato.protocol import framing

READ_SIZE = 64 << 10
FRAME_BYTES = 1 << 20  # an output frame carries at most about this much
EXIT_AFTER_EOF_S = 1.0  # a process's exit waits this long for its streams' end
PR_SET_DUMPABLE = 4
SHELL = "/bin/sh"
TUNNEL_CONNECT_S = 5.0  # a tunnel's connection to its port inside the sandbox
TUNNEL_READ = 256 << 10  # one read of a tunnel's bytes


def _returncode(code: int) -> tuple[int, str]:
    """Shell style: killed by signal N is 128 + N."""
    if code >= 0:
        return code, ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return 128 - code, f"killed by {name}"


class Proc:
    def __init__(self, pid: int, popen: subprocess.Popen, timeout: float | None) -> None:
        self.pid = pid
        self.popen = popen
        self.timeout = timeout
        self.open_streams = 2
        self.streams_done = threading.Event()
        self.timed_out = False
        self.stdin: queue.SimpleQueue[tuple[bytes, bool]] | None = None
        self.master: int | None = None  # with a terminal: its controlling side (owned)


class SandboxAgent:
    def __init__(self, container_id: str, channel: str, token: str, spec: m.SandboxSpec) -> None:
        self.config = spec
        self.sock = framing.connect(channel)
        self._tunnel_dial = (channel, container_id, token)  # tunnels dial the channel again
        self._send_lock = threading.Lock()
        self._send(m.ContainerHello(container_id, token))
        self.procs: dict[int, Proc] = {}
        self._lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # (pid, stream) -> fd, for the streams still open
        self._fds: dict[tuple[int, int], int] = {}
        self._paused: set[tuple[int, int]] = set()
        self._ended: list[Proc] = []  # (the output thread's) streams ended, not yet sent
        self.stopping = threading.Event()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STRATO_") and k not in ("PYTHONPATH",)
        }
        self.env.update(spec.env)
        self.workdir = self.config.workdir or os.getcwd()
        if not os.path.isdir(self.workdir):  # made as Docker's WORKDIR is (where it may)
            try:
                os.makedirs(self.workdir, exist_ok=True)
            except OSError:
                pass  # each exec then fails with the reason (exit code 127)

    # ------------------------------------------------------------------ channel

    def _send(self, msg: m.Struct) -> None:
        data = m.encode(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def serve(self) -> int:
        threading.Thread(target=self._pump, name="sandbox-output", daemon=True).start()
        if self.config.entrypoint:
            self._exec(m.SbExec(pid=1, argv=list(self.config.entrypoint)), entrypoint=True)
        self._send(m.ContainerReady())
        reader = framing.SocketReader(self.sock, m.decode)
        try:
            while (msg := reader.read()) is not None:
                if isinstance(msg, m.SbExec):
                    self._exec(msg)
                elif isinstance(msg, m.SbStdin):
                    self._stdin(msg)
                elif isinstance(msg, m.SbFile):  # a thread each: a FIFO must not stall us
                    threading.Thread(target=self._file, args=(msg,), daemon=True).start()
                elif isinstance(msg, m.SbConfigure):  # handed out from the warm pool
                    self.env.update(msg.env)
                    self.workdir = msg.workdir or self.workdir
                    if msg.entrypoint:
                        self._exec(m.SbExec(pid=1, argv=list(msg.entrypoint)), entrypoint=True)
                elif isinstance(msg, m.SbResize):
                    self._resize(msg)
                elif isinstance(msg, m.SbTunnelOpen):  # a client of a port: a pipe to it
                    threading.Thread(target=self._tunnel, args=(msg,), daemon=True).start()
                elif isinstance(msg, m.SbFlow):
                    self._commands.put(("flow", msg.pid, msg.stream, msg.paused))
                    os.write(self._wake_w, b"x")
                elif isinstance(msg, m.StopContainer):
                    break
        except (OSError, framing.FrameError):
            pass
        self.stopping.set()
        self._kill_all()
        return 0

    # ------------------------------------------------------------------ processes

    def _exec(self, msg: m.SbExec, entrypoint: bool = False) -> None:
        env = dict(self.env)
        env.update(msg.env)
        cwd = msg.workdir or self.workdir
        if msg.pty:
            self._exec_pty(msg, env, cwd)
            return
        if not os.path.isdir(cwd):
            self._fail_start(msg.pid, f"cd: {cwd}: No such directory\n", 127)
            return
        try:
            try:
                popen = self._popen(list(msg.argv), env, cwd)
            except (FileNotFoundError, PermissionError) as e:
                if not os.path.exists(SHELL):
                    self._fail_start(msg.pid, f"{msg.argv[0]}: {e.strerror or e}\n", 127)
                    return
                # the shell says what is wrong with the program, and exits 127 (or 126)
                popen = self._popen([SHELL, "-c", 'exec "$0" "$@"', *msg.argv], env, cwd)
        except OSError as e:
            self._fail_start(msg.pid, f"{msg.argv[0]}: {e}\n", 126)
            return
        p = Proc(msg.pid, popen, msg.timeout)
        with self._lock:
            self.procs[msg.pid] = p
        assert popen.stdout is not None and popen.stderr is not None
        # the output thread owns these descriptors (it closes them at their end)
        out_fd, err_fd = os.dup(popen.stdout.fileno()), os.dup(popen.stderr.fileno())
        popen.stdout.close()
        popen.stderr.close()
        self._commands.put(("add", msg.pid, out_fd, err_fd))
        os.write(self._wake_w, b"x")
        threading.Thread(
            target=self._wait, args=(p, entrypoint), name=f"sandbox-wait-{msg.pid}", daemon=True
        ).start()

    def _exec_pty(self, msg: m.SbExec, env: dict[str, str], cwd: str) -> None:
        """A process on a terminal of its own (its session's controlling terminal): its
        output, both streams, is stdout; stdin's end is a ^D."""
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        if msg.size is not None:
            size = struct.pack("HHHH", msg.size.rows, msg.size.cols, 0, 0)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        env.setdefault("TERM", "xterm-256color")

        def controlling_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            popen = subprocess.Popen(
                list(msg.argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=controlling_terminal,  # noqa: PLW1509 - only an ioctl
                close_fds=True,
            )
        except OSError as e:
            os.close(master)
            os.close(slave)
            self._fail_start(msg.pid, f"{msg.argv[0]}: {e.strerror or e}\n", 127)
            return
        os.close(slave)
        p = Proc(msg.pid, popen, msg.timeout)
        p.master = master
        with self._lock:
            self.procs[msg.pid] = p
        self._send(m.SbOutput([m.SbChunk(msg.pid, 2, b"", eof=True)]))
        p.open_streams = 1
        self._commands.put(("add1", msg.pid, os.dup(master)))
        os.write(self._wake_w, b"x")
        threading.Thread(
            target=self._wait, args=(p, False), name=f"sandbox-wait-{msg.pid}", daemon=True
        ).start()

    def _resize(self, msg: m.SbResize) -> None:
        import fcntl
        import struct
        import termios

        with self._lock:
            p = self.procs.get(msg.pid)
        if p is not None and p.master is not None and p.popen.poll() is None:
            size = struct.pack("HHHH", msg.size.rows, msg.size.cols, 0, 0)
            try:
                fcntl.ioctl(p.master, termios.TIOCSWINSZ, size)
            except OSError:
                pass

    def _popen(self, argv: list[str], env: dict[str, str], cwd: str) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )

    def _fail_start(self, pid: int, message: str, code: int) -> None:
        self._send(
            m.SbOutput(
                [m.SbChunk(pid, 1, b"", eof=True), m.SbChunk(pid, 2, message.encode(), True)]
            )
        )
        self._send(m.SbExit(pid, code, message.strip()[:1000]))

    def _stdin(self, msg: m.SbStdin) -> None:
        with self._lock:
            p = self.procs.get(msg.pid)
        if p is None:
            return
        if p.stdin is None:
            p.stdin = queue.SimpleQueue()
            threading.Thread(
                target=self._write_stdin, args=(p,), name=f"sandbox-stdin-{p.pid}", daemon=True
            ).start()
        p.stdin.put((msg.data, msg.eof))

    @staticmethod
    def _write_stdin(p: Proc) -> None:
        assert p.stdin is not None
        if p.master is not None:
            fd = p.master
        else:
            assert p.popen.stdin is not None
            fd = p.popen.stdin.fileno()
        while True:
            data, eof = p.stdin.get()
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if eof:
                    if p.master is not None:
                        os.write(fd, b"\x04")  # a terminal's end of input
                    else:
                        p.popen.stdin.close()  # type: ignore[union-attr]
                    return
            except (OSError, ValueError):  # it closed its stdin, or exited
                return

    def _wait(self, p: Proc, entrypoint: bool) -> None:
        try:
            code = p.popen.wait(timeout=p.timeout)
        except subprocess.TimeoutExpired:
            p.timed_out = True
            self._kill_group(p)
            code = p.popen.wait()
        if p.master is not None and not _group_alive(p.popen.pid):
            self._commands.put(("endpty", p.pid, 0, False))  # (gVisor says no EIO)
            os.write(self._wake_w, b"x")
        p.streams_done.wait(EXIT_AFTER_EOF_S)
        rc, reason = _returncode(code)
        if p.timed_out:
            rc, reason = 124, f"killed by its timeout ({p.timeout:g}s)"
        try:
            self._send(m.SbExit(p.pid, rc, reason))
        except OSError:
            pass
        if p.master is not None:  # (its stdin writer, if any, then fails and ends)
            master, p.master = p.master, None
            os.close(master)
        if entrypoint:  # the sandbox ends with its entrypoint
            self.stopping.set()
            self._kill_all()
            try:
                self.sock.shutdown(2)
            except OSError:
                pass
            os._exit(rc & 0xFF)

    @staticmethod
    def _kill_group(p: Proc) -> None:
        try:
            os.killpg(p.popen.pid, signal.SIGKILL)
        except OSError:
            try:
                p.popen.kill()
            except OSError:
                pass

    def _kill_all(self) -> None:
        with self._lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.popen.poll() is None:
                self._kill_group(p)

    # ------------------------------------------------------------------ files

    def _file(self, msg: m.SbFile) -> None:
        try:
            result = file_op(msg.request, self.workdir)
        except OSError as e:
            result = m.FileResult(
                error=f"{msg.request.path}: {e.strerror or e}"[:4000],
                error_kind=_ERRNO_KINDS.get(e.errno or 0, "other"),
            )
        try:
            self._send(m.SbFileResult(msg.req_id, result))
        except OSError:
            pass

    # ------------------------------------------------------------------ tunnels

    def _tunnel(self, msg: m.SbTunnelOpen) -> None:
        """Connect to the port inside the sandbox and dial the channel for the client the
        control plane holds (``SbTunnelHello``), then pipe bytes both ways."""
        channel, container_id, token = self._tunnel_dial
        port, error = None, ""
        for host in ("127.0.0.1", "::1"):
            try:
                port = socket.create_connection((host, msg.port), timeout=TUNNEL_CONNECT_S)
                break
            except OSError as e:
                error = f"nothing accepts connections on port {msg.port} in the sandbox ({e})"
        try:
            ch = framing.connect(channel)
            ch.sendall(m.encode(m.SbTunnelHello(container_id, token, msg.conn_id, error)))
        except OSError:
            if port is not None:
                port.close()
            return
        if port is None:
            ch.close()
            return
        port.settimeout(None)
        port.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (asyncio's side has it)
        back = threading.Thread(target=_pipe, args=(ch, port), daemon=True)
        back.start()
        _pipe(port, ch)
        back.join()
        port.close()
        ch.close()

    # ------------------------------------------------------------------ output

    def _pump(self) -> None:
        sel = self.sel
        while True:
            chunks: list[m.SbChunk] = []
            size = 0
            for key, _ in sel.select():
                if key.data is None:  # woken: apply the commands
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    chunks += self._apply_commands()
                    continue
                pid, stream = key.data
                for _ in range(2):  # and at once its end, if it has come (one frame)
                    try:
                        data = os.read(key.fd, READ_SIZE)
                    except BlockingIOError:
                        break
                    except OSError:
                        data = b""
                    if not data:
                        self._close_stream(pid, stream)
                        chunks.append(m.SbChunk(pid, stream, b"", eof=True))
                        break
                    chunks.append(m.SbChunk(pid, stream, data))
                    size += len(data)
                    if len(data) == READ_SIZE:
                        break
                if size >= FRAME_BYTES:
                    break
            if chunks:
                try:
                    self._send(m.SbOutput(chunks))
                except OSError:
                    return
            for p in self._ended:  # their SbExit may go now: after their output's end
                p.streams_done.set()
            self._ended.clear()

    def _apply_commands(self) -> list[m.SbChunk]:
        out: list[m.SbChunk] = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return out
            if cmd[0] == "endpty":  # its process and group are gone: what is left, its end
                self._end_terminal(cmd[1], out)
            elif cmd[0] == "add1":  # a terminal: one stream
                _, pid, fd = cmd
                os.set_blocking(fd, False)
                self._fds[(pid, 1)] = fd
                self.sel.register(fd, selectors.EVENT_READ, (pid, 1))
            elif cmd[0] == "add":
                _, pid, out_fd, err_fd = cmd
                for stream, fd in ((1, out_fd), (2, err_fd)):
                    os.set_blocking(fd, False)
                    self._fds[(pid, stream)] = fd
                    self.sel.register(fd, selectors.EVENT_READ, (pid, stream))
            else:
                _, pid, stream, paused = cmd
                key = (pid, stream)
                fd = self._fds.get(key)
                if paused and key not in self._paused:
                    self._paused.add(key)
                    if fd is not None:
                        self.sel.unregister(fd)
                elif not paused and key in self._paused:
                    self._paused.discard(key)
                    if fd is not None:
                        self.sel.register(fd, selectors.EVENT_READ, key)

    def _end_terminal(self, pid: int, out: list[m.SbChunk]) -> None:
        """A terminal whose process group is gone ends once read dry: Linux says EIO
        when the last holder of its other side is gone, gVisor never does."""
        fd = self._fds.get((pid, 1))
        if fd is None or (pid, 1) in self._paused:
            return
        for _ in range(64):
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:  # (BlockingIOError: nothing left)
                data = b""
            if not data:
                self._close_stream(pid, 1)
                out.append(m.SbChunk(pid, 1, b"", eof=True))
                return
            out.append(m.SbChunk(pid, 1, data))

    def _close_stream(self, pid: int, stream: int) -> None:
        fd = self._fds.pop((pid, stream), None)
        if fd is not None:
            self.sel.unregister(fd)
            os.close(fd)
        with self._lock:
            p = self.procs.get(pid)
        if p is not None:
            p.open_streams -= 1
            if p.open_streams == 0:
                self._ended.append(p)  # (its end is sent first: see _pump)


_ERRNO_KINDS: dict[int, str] = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.EISDIR: "is_dir",
    errno.ENOTDIR: "not_dir",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EROFS: "permission",
    errno.ENOTEMPTY: "not_empty",
}


def file_op(req: m.FileRequest, workdir: str) -> m.FileResult:
    """One file operation, as the sandbox's user (it may do what its processes may)."""
    path = os.path.join(workdir, req.path)
    if req.op == "read":
        with open(path, "rb") as f:
            f.seek(req.offset)
            return m.FileResult(data=f.read(req.length))
    if req.op == "write":
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if req.truncate else 0)
        if req.append:
            flags |= os.O_APPEND
        fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(req.data)
            if req.append:
                while view:
                    view = view[os.write(fd, view) :]
            else:
                at = req.offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            return m.FileResult(size=os.fstat(fd).st_size)
        finally:
            os.close(fd)
    if req.op == "sync":  # before a snapshot: writes reach the writable layer
        os.sync()
        return m.FileResult()
    if req.op == "stat":
        st = os.stat(path)
        return m.FileResult(size=st.st_size, is_dir=stat.S_ISDIR(st.st_mode))
    if req.op == "ls":
        return m.FileResult(entries=sorted(os.listdir(path))[:100_000], is_dir=True)
    if req.op == "mkdir":
        if req.recursive:
            os.makedirs(path, exist_ok=True)
        else:
            os.mkdir(path)
        return m.FileResult(is_dir=True)
    if req.op == "rm":
        if os.path.isdir(path) and not os.path.islink(path):
            if req.recursive:
                import shutil  # (here: it imports a dozen modules)

                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        return m.FileResult()
    raise OSError(errno.EINVAL, f"unknown file operation {req.op}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Bytes from ``src`` to ``dst`` until ``src`` ends (then half-close ``dst``); on an
    error both are shut down, which ends the other direction too."""
    try:
        while data := src.recv(TUNNEL_READ):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _not_dumpable() -> None:
    """Its processes run as its user: keep them out of its memory and environment."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _erase_environ(name: str) -> None:
    """Overwrite ``name``'s value in the process's initial environment block, which
    ``/proc/PID/environ`` shows (gVisor shows it even to a process of another session),
    then unset it."""
    prefix = name.encode() + b"="
    try:
        libc = ctypes.CDLL(None)
        environ = ctypes.cast(
            ctypes.c_void_p.in_dll(libc, "environ").value or 0, ctypes.POINTER(ctypes.c_void_p)
        )
        i = 0
        while (addr := environ[i]) is not None:
            entry = ctypes.string_at(addr)
            if entry.startswith(prefix):
                ctypes.memset(addr + len(prefix), ord("0"), len(entry) - len(prefix))
            i += 1
    except (OSError, ValueError, AttributeError):
        pass
    os.environ.pop(name, None)


def main(spec: m.SandboxSpec) -> None:
    _not_dumpable()
    token = settings.CONTAINER_TOKEN.required()
    _erase_environ(settings.CONTAINER_TOKEN.name)
    agent = SandboxAgent(settings.CONTAINER_ID.required(), settings.CHANNEL.required(), token, spec)
    del token

    def on_term(*_: object) -> None:
        agent._kill_all()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    sys.exit(agent.serve())
