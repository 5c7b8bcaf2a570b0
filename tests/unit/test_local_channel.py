"""The local client's API requests over the control plane's channel socket: hello with the
token, answers by request id, and dialling again (and resending) when the connection drops."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import msgspec
import pytest

from strato import exceptions as exc
from strato.client.local_channel import LocalChannelClient
from strato.protocol import frames
from strato.protocol import messages as m


class FakeChannel:
    """A Unix-socket server speaking the channel: checks the hello, answers each request
    with its path; ``drop_next`` closes the connection instead of answering once."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        self.hellos: list[str] = []
        self.requests: list[m.ApiRequest] = []
        self.drop_next = False
        self.slow_s = 0.0  # answer "/slow" this much later, others at once
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = frames.SocketReader(conn)
        lock = threading.Lock()
        try:
            hello = reader.read()
            assert isinstance(hello, m.ClientHello)
            self.hellos.append(hello.token)
            while (req := reader.read()) is not None:
                assert isinstance(req, m.ApiRequest)
                self.requests.append(req)
                if self.drop_next:
                    self.drop_next = False
                    conn.close()
                    return
                body = msgspec.msgpack.encode({"path": req.path, "n": len(self.requests)})
                frame = frames.encode(m.ApiResponse(req.req_id, 200, body))
                if req.path == "/slow":
                    threading.Timer(self.slow_s, self._send, (conn, lock, frame)).start()
                else:
                    self._send(conn, lock, frame)
        except OSError:
            pass

    @staticmethod
    def _send(conn: socket.socket, lock: threading.Lock, frame: bytes) -> None:
        with lock:
            try:
                conn.sendall(frame)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def channel(tmp_path):
    ch = FakeChannel(tmp_path / "channel.sock")
    yield ch
    ch.close()


def test_requests_go_over_the_socket_after_a_hello(channel):
    client = LocalChannelClient("http://127.0.0.1:1", "tok-1", channel.path)
    got = msgspec.msgpack.decode(client.request_raw("GET", "/health", params={"a": 1}))
    assert got == {"path": "/health", "n": 1}
    assert channel.hellos == ["tok-1"]
    assert channel.requests[0].query == {"a": "1"}
    client.close()


def test_a_dropped_connection_is_dialled_again_and_the_request_resent(channel):
    client = LocalChannelClient("http://127.0.0.1:1", "tok-1", channel.path)
    client.request_raw("GET", "/first")
    channel.drop_next = True
    got = msgspec.msgpack.decode(client.request_raw("POST", "/calls", b"x"))
    assert got["path"] == "/calls"
    assert [r.path for r in channel.requests] == ["/first", "/calls", "/calls"]
    assert channel.hellos == ["tok-1", "tok-1"]  # a second connection
    client.close()


def test_no_socket_fails_at_once_and_a_lost_one_within_the_reconnect_timeout(channel, tmp_path):
    with pytest.raises(OSError):
        LocalChannelClient("http://127.0.0.1:1", "t", str(tmp_path / "nothing.sock"))
    client = LocalChannelClient("http://127.0.0.1:1", "t", channel.path, reconnect_timeout=0.3)
    channel.close()
    Path(channel.path).unlink()
    client.close()  # the server is gone: dialling fails until the reconnect timeout
    with pytest.raises(exc.ConnectionError, match="cannot reach"):
        client.request_raw("GET", "/health")


def test_threads_share_one_connection_and_each_gets_its_own_answer(channel):
    """The thread that reads the socket hands the others their answers: a quick request
    made while a slow one waits (and reads) is answered without waiting for the slow one."""
    channel.slow_s = 1.0
    client = LocalChannelClient("http://127.0.0.1:1", "tok-1", channel.path)
    slow: list[dict] = []
    reader = threading.Thread(
        target=lambda: slow.append(msgspec.msgpack.decode(client.request_raw("GET", "/slow")))
    )
    reader.start()
    while not channel.requests:  # the slow request is in
        threading.Event().wait(0.01)
    errors: list[BaseException] = []

    def many(k: int) -> None:
        try:
            for i in range(50):
                got = msgspec.msgpack.decode(client.request_raw("GET", f"/t{k}/{i}"))
                assert got["path"] == f"/t{k}/{i}"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=many, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert not slow, "the server holds /slow back for 1 s; 300 quick requests took longer"
    reader.join(30)
    assert slow and slow[0]["path"] == "/slow"
    assert channel.hellos == ["tok-1"]  # all on one connection
    client.close()


def test_an_unanswered_request_times_out(channel, monkeypatch):
    monkeypatch.setattr("strato.client.local_channel.ANSWER_MARGIN_S", 0.0)
    channel.slow_s = 5.0
    client = LocalChannelClient("http://127.0.0.1:1", "t", channel.path)
    with pytest.raises(exc.TimeoutError, match="did not answer GET /slow"):
        client.request_raw("GET", "/slow", timeout=0.2)
    assert msgspec.msgpack.decode(client.request_raw("GET", "/after"))["path"] == "/after"
    client.close()


def test_a_signal_handler_calling_while_its_thread_reads_gets_a_clear_error(channel):
    """A request from a signal handler that interrupted the thread reading for everyone
    would wait on that very read: it is refused at once (it used to hang until its timeout)."""
    import signal

    channel.slow_s = 0.5
    client = LocalChannelClient("http://127.0.0.1:1", "t", channel.path)
    seen: list[BaseException] = []

    def handler(*_: object) -> None:
        try:
            client.request_raw("GET", "/from-handler", timeout=5)
        except exc.ExecutionError as e:
            seen.append(e)

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # fires while the main thread waits on /slow
        got = msgspec.msgpack.decode(client.request_raw("GET", "/slow"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert got["path"] == "/slow"
    assert len(seen) == 1 and "signal handler" in str(seen[0])
    assert msgspec.msgpack.decode(client.request_raw("GET", "/after"))["path"] == "/after"
    client.close()
