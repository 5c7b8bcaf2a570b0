"""Who may see the dashboard: the holder of the API token.

The login form takes the token (compared in constant time) and sets a session cookie
(``HttpOnly``, ``SameSite=Strict``, ``Path=/ui``; ``Secure`` behind HTTPS) that carries
an expiry and an HMAC of it under the token: never the token itself. Changing the token
ends every session. A request may instead carry ``Authorization: Bearer <token>``.
Every state-changing request (POST) also carries a CSRF token derived from the session
(a form field or the ``X-CSRF-Token`` header htmx sends)."""

from __future__ import annotations

import hashlib
import hmac
import time

from .http import Request

COOKIE = "strato_ui"
SESSION_S = 12 * 3600


class Auth:
    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._bearer = f"Bearer {token}".encode()

    def _mac(self, what: str) -> str:
        return hmac.new(self._token, what.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.strip().encode(), self._token)

    def new_session(self, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + SESSION_S)
        return f"v1.{expires}.{self._mac(f'session:{expires}')}"

    def session_ok(self, value: str, now: float | None = None) -> bool:
        try:
            version, expires, mac = value.split(".", 2)
            if version != "v1" or int(expires) < (now if now is not None else time.time()):
                return False
        except ValueError:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(f"session:{expires}").encode())

    def allowed(self, req: Request) -> bool:
        auth = req.headers.get("authorization")
        if auth is not None:
            return hmac.compare_digest(auth.encode(), self._bearer)
        return self.session_ok(req.cookies.get(COOKIE, ""))

    def csrf(self, req: Request) -> str:
        """The CSRF token of the request's session ('' without one)."""
        session = req.cookies.get(COOKIE, "")
        return self._mac(f"csrf:{session}")[:40] if session else ""

    async def csrf_ok(self, req: Request) -> bool:
        if "authorization" in req.headers:  # a script with the token: no browser, no CSRF
            return self.allowed(req)
        want = self.csrf(req)
        given = req.headers.get("x-csrf-token") or (await req.form()).get("csrf", "")
        return bool(want) and hmac.compare_digest(given.encode(), want.encode())

    def cookie(self, value: str, secure: bool, max_age: int = SESSION_S) -> tuple[bytes, bytes]:
        attrs = f"{COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict"
        if secure:
            attrs += "; Secure"
        return (b"set-cookie", attrs.encode())
