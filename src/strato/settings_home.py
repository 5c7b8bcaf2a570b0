"""Settings of where things are: strato's home folder, the control plane's URL, the API
token, the workspace, the log level. Re-exported by ``strato.settings``."""

from __future__ import annotations

from strato.settings_base import (
    CLIENT,
    SERVER,
    WORKER,
    Setting,
    _const,
    _declare,
    _default_home,
    _parse_path,
    flag,
    text,
)

# ======================================================================================
# Where things are

HOME = _declare(
    Setting(
        "STRATO_HOME",
        kind="path",
        parse=_parse_path,
        default=_default_home,
        shown_default="`~/.strato`",
        meaning="The folder of this machine's strato state: the embedded control plane's "
        "database, blobs, tokens, logs, and the worker's caches and built images. Private "
        "to its user.",
        readers=(CLIENT, SERVER, WORKER),
        expected="a filesystem path",
    )
)
SERVER_URL = text(
    "STRATO_SERVER_URL",
    "http://127.0.0.1:7749",
    "Where clients find the control plane. Where nothing answers at a loopback URL, "
    "`strato run` starts the embedded one there.",
    (CLIENT,),
    kind="url",
)
CLIENT_HTTP = flag(
    "STRATO_CLIENT_HTTP",
    False,
    "Send API requests over HTTP even where the control plane is on this machine (by "
    "default a client there uses its channel socket, which answers with less overhead).",
    (CLIENT,),
)
TOKEN = text(
    "STRATO_TOKEN",
    "",
    "The API token. The control plane accepts it, clients and worker agents send it.",
    (CLIENT, SERVER, WORKER),
    shown_default="`$STRATO_HOME/token`, made on the control plane's first start",
)


def _workspace_name(value: str) -> str:
    if not (len(value) <= 48 and value.replace("-", "").isalnum() and value.islower()):
        raise ValueError(value)
    return value


WORKSPACE = _declare(
    Setting(
        "STRATO_WORKSPACE",
        "str",
        _workspace_name,
        "a workspace name: at most 48 lowercase letters, digits and '-'",
        _const(""),
        "the token's workspace",
        "The workspace to act in. The installation's token may act in any workspace (default "
        "`main`); a workspace token only in its own (another is refused).",
        (CLIENT,),
    )
)
LOG_LEVEL = text(
    "STRATO_LOG_LEVEL",
    "INFO",
    "How much the control plane and the worker agent log.",
    (SERVER, WORKER),
    choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    upper=True,
)
