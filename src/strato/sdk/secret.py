"""``strato.Secret``: key/value pairs set as environment variables in the containers of
the functions (and classes) that name them, with Modal's constructors.

- ``Secret.from_name(name)``: a secret made with ``strato secret create NAME KEY=VALUE``;
  looked up when the app is created (an unknown name refuses the app).
- ``Secret.from_dict({...})``, ``Secret.from_dotenv(path)``,
  ``Secret.from_local_environ([...])``: values from this process, sent once, when the app
  is created, as an anonymous secret of their own (encrypted at rest like named ones).
  The function's spec carries only the secret's id.

Nothing here talks to the control plane before ``app.run()`` / ``app.deploy()``: a
container imports the app's module (and builds these objects) without sending anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from strato import exceptions as exc
from strato.protocol import messages as m

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")


def _in_container() -> bool:
    from strato import settings

    return settings.IN_CONTAINER.get()


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise exc.InvalidError(
            f"secret name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit"
        )
    return name


def check_values(values: object, what: str) -> dict[str, str]:
    """Keys that can be environment variables, str values; errors name keys, never
    values."""
    if not isinstance(values, Mapping):
        raise exc.InvalidError(f"{what}: give a dict of str to str")
    out: dict[str, str] = {}
    for k, v in values.items():
        if not isinstance(k, str) or not _KEY.match(k):
            raise exc.InvalidError(
                f"{what}: key {k!r} cannot be an environment variable name (letters, digits "
                "and '_', not starting with a digit)"
            )
        if k.startswith("STRATO_"):
            raise exc.InvalidError(f"{what}: key {k!r} is reserved (STRATO_*)")
        if not isinstance(v, str):
            raise exc.InvalidError(f"{what}: the value of {k!r} is a {type(v).__name__}, not a str")
        if "\0" in v:
            raise exc.InvalidError(f"{what}: the value of {k!r} contains a NUL byte")
        if len(v) > m.SECRET_VALUE_MAX:
            raise exc.InvalidError(
                f"{what}: the value of {k!r} is over {m.SECRET_VALUE_MAX} characters"
            )
        out[k] = v
    if len(out) > m.SECRET_MAX_KEYS:
        raise exc.InvalidError(f"{what}: at most {m.SECRET_MAX_KEYS} keys")
    return out


def _unquote(raw: str, lineno: int, where: str) -> str:
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        end = raw.find(quote, 1)
        while quote == '"' and end > 0 and raw[end - 1] == "\\":
            end = raw.find(quote, end + 1)
        if end < 0:
            raise exc.InvalidError(f"{where}, line {lineno}: a quoted value is not closed")
        inner = raw[1:end]
        if quote == '"':
            inner = (
                inner.replace("\\n", "\n")
                .replace("\\t", "\t")
                .replace('\\"', '"')
                .replace("\\\\", "\\")
            )
        return inner
    return raw.split(" #", 1)[0].rstrip()  # an unquoted value ends at a comment


def parse_dotenv(text: str, where: str = ".env") -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` prefix, ``#`` comments, single or double quotes,
    ``\\n`` escapes in double quotes). Errors give the line number, never its text."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("export "):
            s = s[len("export ") :].lstrip()
        key, sep, value = s.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise exc.InvalidError(
                f"{where}, line {lineno}: expected KEY=VALUE with KEY an environment variable name"
            )
        out[key] = _unquote(value, lineno, where)
    return out


class Secret:
    """Environment variables for a function's containers (Modal's ``modal.Secret``)."""

    def __init__(
        self,
        *,
        name: str | None = None,
        values: dict[str, str] | None = None,
        required_keys: Iterable[str] = (),
    ) -> None:
        self._name = name
        self._values = values  # anonymous: sent with each app created (each gets its own)
        self._required = list(required_keys)
        self._secret_id = ""

    def __repr__(self) -> str:
        if self._name is not None:
            return f"Secret.from_name({self._name!r})"
        return f"<strato.Secret {self._secret_id or 'anonymous'}>"  # never its values

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def object_id(self) -> str | None:
        return self._secret_id or None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        environment_name: str | None = None,
        required_keys: list[str] | None = None,
    ) -> Secret:
        """A secret created with ``strato secret create NAME KEY=VALUE ...``. With
        ``required_keys``, the app is refused when it lacks one. (``environment_name``:
        a control plane is one environment; accepted for ported code.)"""
        check_name(name)
        keys = list(required_keys or [])
        for k in keys:
            if not isinstance(k, str) or not _KEY.match(k):
                raise exc.InvalidError(f"Secret.from_name({name!r}): bad required key {k!r}")
        return cls(name=name, required_keys=keys)

    @classmethod
    def from_dict(cls, env_dict: dict[str, str | None] | None = None) -> Secret:
        """These pairs (keys whose value is None are left out, as in Modal)."""
        given = {k: v for k, v in (env_dict or {}).items() if v is not None}
        return cls(values=check_values(given, "Secret.from_dict"))

    @classmethod
    def from_local_environ(cls, env_keys: list[str]) -> Secret:
        """These variables of this process's environment, as they are now."""
        if isinstance(env_keys, str) or not all(isinstance(k, str) for k in env_keys):
            raise exc.InvalidError("Secret.from_local_environ: give a list of variable names")
        if _in_container():  # the app's module imported in its container: already set
            return cls(values={})
        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise exc.InvalidError(
                f"Secret.from_local_environ: {missing} not set in this environment"
            )
        return cls(values=check_values({k: os.environ[k] for k in env_keys}, "from_local_environ"))

    @classmethod
    def from_dotenv(
        cls, path: str | os.PathLike | None = None, *, filename: str = ".env"
    ) -> Secret:
        """The pairs of a ``.env`` file: ``path`` itself when it is a file, else
        ``filename`` in the folder ``path`` (default: the current directory), as Modal
        reads it."""
        if _in_container():  # the app's module imported in its container: already set
            return cls(values={})
        base = Path(path) if path is not None else Path.cwd()
        file = base if base.is_file() else base / filename
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise exc.InvalidError(f"Secret.from_dotenv: no file {str(file)!r}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise exc.InvalidError(
                f"Secret.from_dotenv: cannot read {str(file)!r}: {type(e).__name__}"
            ) from None
        return cls(values=check_values(parse_dotenv(text, str(file)), str(file)))

    # ------------------------------------------------------------------ the app's side

    def _ref(self, client) -> m.SecretRef:
        """How a spec names this secret. An anonymous one is created first: one per app
        created (the control plane deletes it when that app stops)."""
        if self._name is not None:
            return m.SecretRef(name=self._name, required_keys=self._required)
        info = client.call(
            "POST", "/secrets", m.CreateSecret(values=self._values or {}), m.SecretInfo
        )
        self._secret_id = info.secret_id
        return m.SecretRef(secret_id=self._secret_id)


def check_secrets(secrets: object, what: str = "secrets=") -> list[Secret]:
    if secrets is None:
        return []
    if isinstance(secrets, Secret) or not isinstance(secrets, list | tuple):
        raise exc.InvalidError(f"{what} takes a list of strato.Secret objects")
    for s in secrets:
        if not isinstance(s, Secret):
            raise exc.InvalidError(f"{what} takes strato.Secret objects, not {type(s).__name__}")
    return list(secrets)


def secret_refs(
    client, secrets: Iterable[Secret], made: dict[int, m.SecretRef] | None = None
) -> list[m.SecretRef]:
    """The references a spec carries for ``secrets`` (anonymous ones created now), in
    order, each once. ``made`` (one per app created) shares an anonymous secret among the
    functions of one app. Reused by whatever starts containers with secrets."""
    made = {} if made is None else made
    out: list[m.SecretRef] = []
    seen: set[int] = set()
    for s in secrets:
        if id(s) not in seen:
            seen.add(id(s))
            if id(s) not in made:
                made[id(s)] = s._ref(client)
            out.append(made[id(s)])
    return out
