"""The control-plane process: HTTP API (uvicorn) + channel + the local worker agent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys

import uvicorn

from strato.providers.local import LocalProvider

from .api.routes import build_app
from .config import ServerConfig
from .control import ControlPlane, server_info_path
from .listeners import api_uvicorn_options

log = logging.getLogger("strato.server")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(config: ServerConfig) -> None:
    config.ensure_dirs()
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    url = f"http://{config.host}:{port}"
    cp = ControlPlane(config, url)
    await cp.start()
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(cp),
            lifespan="off",
            log_level="warning",
            access_log=False,
            **api_uvicorn_options(),  # listener limits (listeners.py)
            proxy_headers=False,
            server_header=False,
            date_header=False,
        )
    )
    info = server_info_path(config.home)
    tmp = info.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"url": url, "pid": os.getpid(), "port": port, "gateway_url": cp.gateway.url})
    )
    os.replace(tmp, info)
    provider = None
    if config.start_local_worker:
        provider = LocalProvider(config.home, f"unix:{config.channel_socket}", cp.token)
        provider.start_worker()
    log.info("strato control plane listening on %s (state in %s)", url, config.home)
    try:
        await server.serve(sockets=[sock])
    finally:
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
        if provider is not None:
            provider.stop_worker()
        await cp.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("STRATO_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = ServerConfig.from_env()
    try:
        import uvloop

        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))
