"""Apps of the workspace-isolation tests: deployed in one workspace (``double``), or in
another (``probe``: code in a container that tries to reach the first workspace's
objects over its channel)."""

from __future__ import annotations

import strato

app = strato.App("ws-iso")


@app.function(runtime="process")
def double(x: int) -> int:
    return 2 * x


probe_app = strato.App("ws-iso-probe")


@probe_app.function(runtime="process")
def probe(requests: list[tuple[str, str, dict | None]]) -> list[str]:
    """Each request sent from this container; what answered (an error's type or "ok")."""
    from strato.client import session

    out = []
    for method, path, body in requests:
        try:
            session.api().call(method, path, body)
            out.append("ok")
        except strato.exceptions.Error as e:
            out.append(type(e).__name__)
    return out


web_app = strato.App("ws-iso-web")  # deployed under one name in two workspaces


@web_app.function(runtime="process", secrets=[strato.Secret.from_name("ws-iso-who")])
@strato.fastapi_endpoint()
def who() -> dict:
    import os

    return {"who": os.environ["WHO"]}  # its workspace's secret of that name
