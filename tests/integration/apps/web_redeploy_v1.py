"""Version 1 of a web app that tests redeploy (web_redeploy_v2 is version 2)."""

from __future__ import annotations

import time

import strato

app = strato.App("web-redeploy")


@app.function()
@strato.concurrent(max_inputs=8)
@strato.fastapi_endpoint()
def version() -> str:
    time.sleep(0.05)
    return "v1"
