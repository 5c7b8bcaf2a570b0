"""A client on the control plane's machine sends its API requests over the channel socket;
a hello without the right token gets nothing."""

from __future__ import annotations

import json
import socket

from apps import basic

from strato.client import session
from strato.client.http import ApiClient
from strato.client.local_channel import LocalChannelClient
from strato.protocol import frames
from strato.protocol import messages as m


def test_a_local_client_uses_the_channel_socket(server, monkeypatch):
    session.reset()
    client = session.api()
    assert isinstance(client, LocalChannelClient)
    with basic.app.run(quiet=True):
        assert basic.square.remote(12) == 144
    monkeypatch.setenv("STRATO_CLIENT_HTTP", "1")  # the way back to HTTP
    session.reset()
    assert isinstance(session.api(), ApiClient)
    session.reset()


def test_a_wrong_token_gets_no_answer(server):
    info = json.loads((server.home / "server.json").read_text())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(info["channel"])
        hello = frames.encode(m.ClientHello("not-the-token"))
        sock.sendall(hello + frames.encode(m.ApiRequest(1, "GET", "/apps")))
        try:
            answer = sock.recv(1024)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed, nothing answered
