"""Memory-snapshot templates: what identifies one, its home on disk and its launch.

A template is a zygote for one function with ``enable_memory_snapshot=True``: it also
imported the function's code and ran its ``@enter(snap=True)`` hooks, so containers forked
from it skip both. Templates are keyed by the hash of the runtime, the Python, the image,
the channel and the whole function spec (with its code's mount id), so new code or a new
image makes a new template."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import msgspec

from strato.protocol import messages as m
from strato.runtime.base import Bind, ContainerLaunch, Runtime

from ..launch import IN_CONTAINER
from .criu import ZYGOTE_MODULE


def template_key(msg: m.ContainerStart, launch: ContainerLaunch, runtime: Runtime) -> str:
    """Runtime, Python, image, channel and the whole spec (with its mount id)."""
    h = hashlib.sha256()
    for part in (runtime.name, launch.argv[0], *launch.rootfs_layers, msg.channel):
        h.update(part.encode() + b"\0")
    h.update(msgspec.msgpack.encode(msg.spec))
    return h.hexdigest()


def write_home(home: Path, msg: m.ContainerStart) -> None:
    """The template's own directory, with the function's spec (what a container's
    directory holds)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "spec.msgpack").write_bytes(msgspec.msgpack.encode(msg.spec))


def template_launch(
    launch: ContainerLaunch,
    name: str,
    home: Path,
    preimport: str,
    *,
    sandboxed: bool,
) -> ContainerLaunch:
    """The launch of the template for the containers like ``launch``: the same sandbox,
    its own directory in place of a container's, no control-plane token. ``sandboxed``:
    the runtime binds the container's directory (else the spec is read at its host
    path)."""
    env = dict(launch.env)
    env.update(
        STRATO_CONTAINER_ID=name,
        STRATO_CONTAINER_TOKEN="",
        STRATO_ZYGOTE_MODE="template",
        STRATO_PREIMPORT=preimport,
    )
    binds = []
    for b in launch.binds:
        if b.dst == IN_CONTAINER + "/container":
            binds.append(Bind(str(home), b.dst))
        else:
            binds.append(b)
    if not sandboxed:
        env["STRATO_CONTAINER_SPEC"] = str(home / "spec.msgpack")
    return dataclasses.replace(
        launch,
        container_id=name,
        argv=[launch.argv[0], "-m", ZYGOTE_MODULE],
        env=env,
        cwd=str(home),
        binds=binds,
        pids_max=None,
    )


def prune_checkpoints(templates: Path, live: set[Path | None], keep_s: float) -> None:
    """Delete template homes (checkpoints on disk) unused for ``keep_s`` seconds: those of
    old code, mostly."""
    try:
        homes = list(templates.iterdir())
    except OSError:
        return
    for home in homes:
        try:
            old = time.time() - home.stat().st_mtime > keep_s
        except OSError:
            continue
        if old and home not in live:
            shutil.rmtree(home, ignore_errors=True)
