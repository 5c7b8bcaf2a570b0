"""Who may see the dashboard: the holder of a token, and what of it (``app.py``).

The login form takes a token: the installation's (every page, as its operator) or a
workspace's (that workspace's apps, calls, containers and objects only; no nodes, and no
stopping with a read-only one). It sets a session cookie (``HttpOnly``,
``SameSite=Strict``, ``Path=/ui``; ``Secure`` behind HTTPS) that carries an expiry, the
workspace token's id (``op`` for the installation's) and an HMAC of both under the
installation's token: never a token itself. Changing the installation's token ends every
session; revoking a workspace token ends its sessions at once. A request may instead
carry ``Authorization: Bearer <token>``. Every state-changing request (POST) also carries
a CSRF token derived from the session (a form field or the ``X-CSRF-Token`` header htmx
sends)."""

from __future__ import annotations

import hashlib
import hmac
import time

from ..workspaces import INSTALLATION, Caller, Workspaces
from .http import Request

COOKIE = "strato_ui"
SESSION_S = 12 * 3600


class Auth:
    def __init__(self, token: str, workspaces: Workspaces) -> None:
        self._token = token.encode()
        self._bearer = f"Bearer {token}".encode()
        self.workspaces = workspaces

    def _mac(self, what: str) -> str:
        return hmac.new(self._token, what.encode(), hashlib.sha256).hexdigest()

    async def login(self, given: str) -> Caller | None:
        """Who the token typed into the login form is (``None``: nobody)."""
        return await self.workspaces.authenticate(given.strip().encode(), None)

    def new_session(self, caller: Caller, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + SESSION_S)
        who = caller.token_id or "op"
        return f"v2.{expires}.{who}.{self._mac(f'session:{expires}:{who}')}"

    def session(self, value: str, now: float | None = None) -> Caller | None:
        try:
            version, expires, who, mac = value.split(".", 3)
            if version != "v2" or int(expires) < (now if now is not None else time.time()):
                return None
        except ValueError:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(f"session:{expires}:{who}").encode()):
            return None
        return INSTALLATION if who == "op" else self.workspaces.cached(who)

    async def caller(self, req: Request) -> Caller | None:
        """Who sent the request: its bearer token's or its session's (``None``: nobody)."""
        auth = req.headers.get("authorization")
        if auth is not None:
            if not auth.startswith("Bearer "):
                return None
            return await self.workspaces.authenticate(auth[7:].encode(), None)
        return self.session(req.cookies.get(COOKIE, ""))

    def operator(self, req: Request) -> bool:
        """Whether the request carries the installation's token (``/metrics``)."""
        auth = req.headers.get("authorization")
        return auth is not None and hmac.compare_digest(auth.encode(), self._bearer)

    def csrf(self, req: Request) -> str:
        """The CSRF token of the request's session ('' without one)."""
        session = req.cookies.get(COOKIE, "")
        return self._mac(f"csrf:{session}")[:40] if session else ""

    async def csrf_ok(self, req: Request) -> bool:
        if "authorization" in req.headers:  # a script with the token: no browser, no CSRF
            return await self.caller(req) is not None
        want = self.csrf(req)
        given = req.headers.get("x-csrf-token") or (await req.form()).get("csrf", "")
        return bool(want) and hmac.compare_digest(given.encode(), want.encode())

    def cookie(self, value: str, secure: bool, max_age: int = SESSION_S) -> tuple[bytes, bytes]:
        attrs = f"{COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict"
        if secure:
            attrs += "; Secure"
        return (b"set-cookie", attrs.encode())
