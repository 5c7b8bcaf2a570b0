"""Routes of Volume.

A container may read the manifest of, and commit to, only the volumes its own function
mounts (a read-only mount: read only); everything else needs the API token.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from typing import TYPE_CHECKING

import msgspec

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store.blobs import check_key, refresh

from ..volumes import ID_PREFIX, VolumeService
from ..workspaces import ACTING
from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router

MAX_BATCH_BYTES = 64 << 20  # blobs fetched in one POST /volume-blobs/get


def put_small(root: str, blobs: list[bytes]) -> list[str]:
    """Store small blobs as the blob store does (``<root>/ab/<sha256>``, written to a
    private temporary file and renamed into place), with fewer system calls; their keys."""
    keys, made = [], set()
    tag = f".tmp{os.getpid()}-{secrets.token_hex(4)}-"
    for i, data in enumerate(blobs):
        key = hashlib.sha256(data).hexdigest()
        keys.append(key)
        folder = f"{root}/{key[:2]}"
        path = f"{folder}/{key}"
        if refresh(path):  # stored already (made young again for the blob collector)
            continue
        if folder not in made:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            made.add(folder)
        tmp = f"{path}{tag}{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return keys


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
    from strato import settings

    svc = VolumeService(cp.store, cp.blobs, settings.VOLUME_MAX_BYTES.get())
    cp.volumes = svc  # type: ignore[attr-defined]
    route = api.add
    empty = reply({})

    # --- workspaces: a route's {ref} becomes the id of that volume in the caller's
    # workspace (another workspace's answers as a missing one). An installation's token
    # (worker agents fetching mounts) or a joined agent may name any volume by id: an app's
    # mounts are ids of its own workspace's volumes, checked as it is created (below).
    async def owned(req: Request, ref: str) -> None:
        anywhere = req.agent is not None or req.caller.operator
        ws = None if anywhere and ref.startswith(ID_PREFIX) else req.caller.workspace
        req.path_params["ref"] = await svc.resolve(ref, ws)

    api.guard("/volumes/", "ref", owned)

    def mounts_of_workspace(spec: m.FunctionSpec, deployed: bool) -> m.FunctionSpec:
        if not spec.volumes:
            return spec
        ws = ACTING.get()
        vols = [
            msgspec.structs.replace(v, volume_id=svc.resolve_now(v.volume_id or v.name or "", ws))
            for v in spec.volumes
        ]
        return msgspec.structs.replace(spec, volumes=vols)

    cp.apps.spec_hooks.append(mounts_of_workspace)

    def mounted(req: Request, ref: str, *, write: bool) -> None:
        """A container may reach only the volumes its function mounts; a joined agent
        (--- cluster) only those of the containers placed on its node."""
        if req.agent is not None:
            fids = {c.function_id for c in cp.fleet.registry.on_node(req.agent.node_id)}
        elif req.principal is not None:
            fids = {req.principal.function_id}
        else:
            return
        mounts = []
        for fid in fids:
            try:
                mounts += cp.calls.function(fid).spec.volumes
            except exc.NotFoundError:
                pass
        named = [v for v in mounts if ref in (v.volume_id, v.name)]
        if not named:
            where = "on this node" if req.agent is not None else "in this container"
            raise exc.NotFoundError(f"volume {ref} is not mounted {where}")
        if write and all(v.read_only for v in named):
            raise exc.InvalidError(
                f"volume {ref} is mounted read-only in this function: it cannot commit"
            )

    @route(
        "POST",
        "/volumes",
        "Create a volume, or find one by name",
        body=m.CreateVolume,
        response=m.VolumeInfo,
    )
    async def create_volume(req: Request) -> Reply:
        return reply(await svc.create(req.decode(m.CreateVolume), req.caller.workspace))

    @route("GET", "/volumes", "Named volumes", response=m.VolumeList)
    async def list_volumes(req: Request) -> Reply:
        return reply(await svc.named(req.caller.workspace))

    @route("GET", "/volumes/{ref}", "A volume by id or name", response=m.VolumeInfo, container=True)
    async def volume_info(req: Request) -> Reply:
        ref = req.path_params["ref"]
        mounted(req, ref, write=False)
        return reply(await svc.info(ref))

    @route("DELETE", "/volumes/{ref}", "Delete a volume and its files")
    async def delete_volume(req: Request) -> Reply:
        await svc.delete(req.path_params["ref"])
        return empty

    @route(
        "GET",
        "/volumes/{ref}/manifest",
        "The latest version's files (under a prefix)",
        response=m.VolumeManifest,
        query={"prefix": str, "data": int},
        container=True,
        node=True,
    )
    async def volume_manifest(req: Request) -> Reply:
        ref = req.path_params["ref"]
        mounted(req, ref, write=False)
        data = bool(req.param("data", int, 1))  # 0: without small files' content
        return reply(await svc.manifest(ref, req.param("prefix", str, ""), data))

    @route(
        "GET",
        "/volumes/{ref}/file",
        "One file's entry",
        response=m.VolumeFile,
        query={"path": str},
        container=True,
    )
    async def volume_file(req: Request) -> Reply:
        ref = req.path_params["ref"]
        mounted(req, ref, write=False)
        return reply(await svc.file(ref, req.param("path", str, "")))

    @route(
        "POST",
        "/volumes/{ref}/commit",
        "Merge changed files into the latest version (per file, the last commit wins)",
        body=m.VolumeCommit,
        response=m.VolumeVersion,
        container=True,
        node=True,
    )
    async def commit_volume(req: Request) -> Reply:
        ref = req.path_params["ref"]
        mounted(req, ref, write=True)
        return reply(await svc.commit(ref, req.decode(m.VolumeCommit)))

    @route(
        "POST",
        "/volumes/{ref}/copy",
        "Copy files within a volume",
        body=m.VolumeCopy,
        response=m.VolumeVersion,
    )
    async def copy_volume_files(req: Request) -> Reply:
        return reply(await svc.copy(req.path_params["ref"], req.decode(m.VolumeCopy)))

    @route(
        "POST",
        "/volume-blobs",
        "Store small blobs in one request; their keys",
        body=m.BlobBatch,
        response=m.BlobKeys,
        container=True,
        node=True,
    )
    async def put_blobs(req: Request) -> Reply:
        blobs = req.decode(m.BlobBatch).blobs
        half = (len(blobs) + 1) // 2  # two threads: hashing and writes let go of the GIL
        parts = await asyncio.gather(
            asyncio.to_thread(put_small, str(cp.blobs.root), blobs[:half]),
            asyncio.to_thread(put_small, str(cp.blobs.root), blobs[half:]),
        )
        return reply(m.BlobKeys(parts[0] + parts[1]))

    @route(
        "POST",
        "/volume-blobs/get",
        "Fetch blobs by key in one request",
        body=m.BlobKeys,
        response=m.BlobBatch,
        container=True,
        node=True,
        access="read",  # a POST that changes nothing
    )
    async def get_blobs(req: Request) -> Reply:
        keys = [check_key(k) for k in req.decode(m.BlobKeys).keys]

        def load() -> list[bytes]:
            out, total = [], 0
            for k in keys:
                data = cp.blobs.get(k)
                total += len(data)
                if total > MAX_BATCH_BYTES:
                    raise exc.RequestSizeError(
                        f"blobs over {MAX_BATCH_BYTES} bytes asked at once: ask for fewer"
                    )
                out.append(data)
            return out

        return reply(m.BlobBatch(await asyncio.to_thread(load)))
