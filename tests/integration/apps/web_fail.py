"""Web endpoints whose containers never become ready: one fails at start-up, one takes
longer than the gateway waits."""

from __future__ import annotations

import time

import strato

app = strato.App("web-fail")


@app.cls()
class Broken:
    @strato.enter()
    def setup(self) -> None:
        raise RuntimeError("this endpoint cannot start")

    @strato.fastapi_endpoint()
    def web(self) -> dict:
        return {"never": True}


@app.cls(max_containers=1)
class Sleepy:
    @strato.enter()
    def setup(self) -> None:
        time.sleep(120)

    @strato.fastapi_endpoint()
    def web(self) -> dict:
        return {"late": True}
