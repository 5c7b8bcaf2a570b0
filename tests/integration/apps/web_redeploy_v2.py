"""Version 2 of the web app of web_redeploy_v1 (same app name and label)."""

from __future__ import annotations

import time

import strato

app = strato.App("web-redeploy")


@app.function()
@strato.concurrent(max_inputs=8)
@strato.fastapi_endpoint()
def version() -> str:
    time.sleep(0.05)
    return "v2"
