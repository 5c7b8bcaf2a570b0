"""The control-plane process: HTTP API (uvicorn) + channel + the local worker agent."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import uvicorn

from strato import settings
from strato.providers.local import LocalProvider

from .api.routes import build_app
from .config import ServerConfig
from .control import ControlPlane, server_info_path
from .dashboard import with_ops
from .listeners import api_uvicorn_options

log = logging.getLogger("strato.server")

# what the control plane keeps under STRATO_HOME: only its user may read it (0600 files,
# 0700 folders). worker/ and images/ hold what containers read (their code, specs, image
# layers): their folders are 0700, their files keep the modes containers need.
PRIVATE_FILES = (
    "state.db",
    "state.db-wal",
    "state.db-shm",
    "token",
    "web_token",
    "server.json",
    "server.lock",
)
PRIVATE_TREES = ("blobs", "logs", "run")
PRIVATE_DIRS = ("worker", "images")


PRIVATE_MARK = ".private"  # the trees below were walked once: new files are 0600 anyway


def secure_home(home: Path) -> None:
    """Make an existing STRATO_HOME private to its user (homes made before this rule)."""
    os.umask(0o077)
    _chmod(home, 0o700)
    for name in PRIVATE_FILES:
        _chmod(home / name, 0o600)
    for name in PRIVATE_DIRS:
        _chmod(home / name, 0o700)
    mark = home / PRIVATE_MARK
    if mark.exists():
        return
    for name in PRIVATE_TREES:
        root = home / name
        if not root.is_dir():
            continue
        _chmod(root, 0o700)
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                _chmod(Path(dirpath, d), 0o700)
            for f in filenames:
                _chmod(Path(dirpath, f), 0o600)
    try:
        mark.touch(mode=0o600)
    except OSError:
        pass


def _chmod(path: Path, mode: int) -> None:
    """Take group and other bits off ``path`` (``mode``: 0o600 or 0o700, for the reader)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    except OSError:
        pass


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(config: ServerConfig) -> None:
    os.umask(0o077)  # the state, blobs, tokens and logs are this user's alone
    config.ensure_dirs()
    secure_home(config.home)
    from .cluster.agents import api_tls_options, check_exposure  # --- cluster

    for warning in check_exposure(config.host, config.load_or_create_token()):
        log.warning("%s", warning)
    # HTTPS where STRATO_TLS_CERT is set (a bad certificate or key stops the start here)
    tls_options = api_tls_options(settings.TLS_CERT.get(), settings.TLS_KEY.get())
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    url = f"{'https' if tls_options else 'http'}://{config.host}:{port}"
    cp = ControlPlane(config, url)
    await cp.start()
    app = with_ops(build_app(cp), cp)  # /metrics and the dashboard (/ui) in front
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            **api_uvicorn_options(),  # listener limits (listeners.py)
            **tls_options,
            proxy_headers=False,
            server_header=False,
            date_header=False,
        )
    )
    app.stopping = lambda: server.should_exit  # the dashboard's streams end at once
    ray_provider = None  # --- ray: the nodes of a Ray cluster, instead of this machine
    if settings.PROVIDER.get() == "ray":
        from strato.providers import ray as ray_provider_mod

        try:
            ray_provider = await ray_provider_mod.start(
                cp, os.environ.get("RAY_ADDRESS"), os.environ
            )
        except BaseException:
            await cp.close()
            raise
        cp.broker.attach(ray_provider)  # --- broker: listed behind the Provider interface
    info = server_info_path(config.home)
    tmp = info.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "url": url,
                "pid": os.getpid(),
                "port": port,
                "gateway_url": cp.gateway.url,
                # clients on this machine send their API requests here (local_channel.py)
                "channel": str(config.channel_socket),
                "agent_port": cp.agents.port if cp.agents is not None else None,  # --- cluster
            }
        )
    )
    os.replace(tmp, info)
    provider = None
    if config.start_local_worker and ray_provider is None:
        provider = LocalProvider(
            config.home,
            f"unix:{config.channel_socket}",
            cp.token,
            on_restart=lambda r: cp.fleet.worker_restarting(
                "the local worker agent died ("
                + (f"signal {r.signal}" if r.signal else f"exit code {r.exit_code}")
                + f"); it is restarted in {r.delay_s:g}s (restart {r.total})"
            ),
        )
        provider.start_worker()
        provider.supervise()
    log.info("strato control plane listening on %s (state in %s)", url, config.home)
    quiet_gc()
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
        if ray_provider is not None:
            await asyncio.to_thread(ray_provider.close)
        await cp.close()


def quiet_gc() -> None:
    """What start-up made (modules, tables, routes: hundreds of thousands of objects that
    live as long as the process) is left out of the cyclic garbage collector's passes,
    and its youngest generation is collected less often: each pass would otherwise walk
    them all again, and a pass runs every few hundred requests."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])


GC_GEN0 = 20_000  # allocations between passes over the youngest generation (Python: 700)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=settings.LOG_LEVEL.get(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = ServerConfig.from_env()
    try:
        import uvloop

        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))
