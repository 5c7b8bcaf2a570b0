"""Settings strato sets for a container (read inside it: its id, channel, token, spec,
code's paths, zygote), and the control plane's metrics and dashboard. Re-exported by
``strato.settings``."""

from __future__ import annotations

from strato.settings_base import (
    CONTAINER,
    SERVER,
    Range,
    Setting,
    ZygoteMode,
    _const,
    _declare,
    _parse_paths,
    flag,
    integer,
    optional_integer,
    text,
)

# ======================================================================================
# Set by strato for a container (read inside it)

CONTAINER_ID = text("STRATO_CONTAINER_ID", "", "This container's id.", (CONTAINER,), internal=True)
CHANNEL = text(
    "STRATO_CHANNEL",
    "",
    "The address of the channel to the control plane (`unix:<path>`).",
    (CONTAINER,),
    internal=True,
)
CONTAINER_TOKEN = text(
    "STRATO_CONTAINER_TOKEN",
    "",
    "The credential of this container on its channel, scoped to it (empty in a "
    "memory-snapshot template, which has no channel of its own).",
    (CONTAINER,),
    internal=True,
    empty_is_unset=False,
)
CONTAINER_SPEC = text(
    "STRATO_CONTAINER_SPEC",
    "",
    "The file holding the function spec this container runs.",
    (CONTAINER,),
    internal=True,
    kind="path",
)
MOUNT_PATHS = _declare(
    Setting(
        "STRATO_MOUNT_PATHS",
        kind="paths",
        parse=_parse_paths,
        default=_const(()),
        shown_default="-",
        meaning="Folders of the app's code, put on `sys.path`, separated by `:`.",
        readers=(CONTAINER,),
        expected="paths separated by ':'",
        internal=True,
    )
)
# --- ops: begin (metrics and dashboard)
METRICS_OPEN_LOOPBACK = flag(
    "STRATO_METRICS_OPEN_LOOPBACK",
    False,
    "Serve `GET /metrics` without the API token to clients on loopback (a Prometheus on "
    "the same host); from anywhere else it still needs the token.",
    (SERVER,),
)
METRICS_MAX_FUNCTIONS = integer(
    "STRATO_METRICS_MAX_FUNCTIONS",
    500,
    "Functions (app and function name pairs) that get their own labels in `/metrics`; "
    'the rest are counted under app="other", function="other".',
    (SERVER,),
    within=Range(1),
)
# --- ops: end
FUNCTION_ID = text(
    "STRATO_FUNCTION_ID",
    "",
    "The id of the function this container runs (for the user's code).",
    (CONTAINER,),
    internal=True,
)
APP_ID = text(
    "STRATO_APP_ID",
    "",
    "The id of the app this container belongs to (for the user's code).",
    (CONTAINER,),
    internal=True,
)
IN_CONTAINER = flag(
    "STRATO_IN_CONTAINER",
    False,
    "Set in a container once strato's entrypoint runs: `Image.imports()` imports for real "
    "and `app.run()` is refused.",
    (CONTAINER,),
    internal=True,
)
ZYGOTE_FD = optional_integer(
    "STRATO_ZYGOTE_FD",
    "-",
    "A zygote's control socket (a file descriptor).",
    (CONTAINER,),
    internal=True,
)


def _parse_zygote_mode(value: str) -> ZygoteMode:
    if value == "zygote":
        return "zygote"
    if value == "template":
        return "template"
    raise ValueError(value)


ZYGOTE_MODE = _declare(
    Setting[ZygoteMode](
        "STRATO_ZYGOTE_MODE",
        kind="zygote|template",
        parse=_parse_zygote_mode,
        default=_const("zygote"),
        shown_default="zygote",
        meaning="What a zygote process is: a plain `zygote`, or a memory-snapshot `template` "
        "that imported a function and ran its `@enter(snap=True)` hooks.",
        readers=(CONTAINER,),
        expected="zygote or template",
        internal=True,
    )
)
