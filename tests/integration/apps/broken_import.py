"""An app whose module fails to import in the container (and only there)."""

import os

import strato

app = strato.App("strato-test-broken-import")

if os.environ.get("STRATO_IN_CONTAINER") == "1":
    raise RuntimeError("this module refuses to import in a container")


@app.function()
def unreachable(x: int) -> int:
    return x
