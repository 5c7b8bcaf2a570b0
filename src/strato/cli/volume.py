"""``strato volume create|list|ls|put|get|rm|cp|delete`` (Modal's ``modal volume``)."""

from __future__ import annotations

import os
import sys
import time

import click

from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m
from strato.protocol.volumes import check_name, norm_path
from strato.sdk.volume import FileEntryType, Volume


def _table(rows: list[list[str]], header: list[str]) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@click.group("volume")
def volume() -> None:
    """Create, list, read, write and delete volumes."""


@volume.command("create")
@click.argument("name")
def create(name: str) -> None:
    """Create a volume named NAME."""
    check_name(name)
    req = m.CreateVolume(name, create_if_missing=True, exists_ok=False)
    info = session.api().call("POST", "/volumes", req, m.VolumeInfo)
    click.echo(f"created volume {name} ({info.volume_id})")


@volume.command("list")
def list_volumes() -> None:
    """List named volumes."""
    vols = session.api().call("GET", "/volumes", None, m.VolumeList).volumes
    rows = [
        [v.name or "-", v.volume_id, str(v.n_files), _size(v.size), _when(v.created_at)]
        for v in vols
    ]
    _table(rows, ["NAME", "VOLUME ID", "FILES", "SIZE", "CREATED"])


@volume.command("ls")
@click.argument("name")
@click.argument("path", default="/")
@click.option("-r", "--recursive", is_flag=True, help="List every level below PATH.")
def ls(name: str, path: str, recursive: bool) -> None:
    """List the files and directories at PATH in volume NAME."""
    entries = Volume.from_name(name).listdir(path, recursive=recursive)
    rows = [
        [
            e.path + ("/" if e.type == FileEntryType.DIRECTORY else ""),
            "dir" if e.type == FileEntryType.DIRECTORY else "file",
            "" if e.type == FileEntryType.DIRECTORY else _size(e.size),
            _when(e.mtime),
        ]
        for e in entries
    ]
    _table(rows, ["PATH", "TYPE", "SIZE", "MODIFIED"])


@volume.command("put")
@click.argument("name")
@click.argument("local_path", type=click.Path(exists=True))
@click.argument("remote_path", default="/")
@click.option("-f", "--force", is_flag=True, help="Overwrite files that exist.")
def put(name: str, local_path: str, remote_path: str, force: bool) -> None:
    """Upload LOCAL_PATH (a file or a directory) to REMOTE_PATH in volume NAME."""
    vol = Volume.from_name(name)
    with vol.batch_upload(force=force) as batch:
        if os.path.isdir(local_path):
            batch.put_directory(local_path, remote_path)
        else:
            remote = remote_path
            if remote.endswith("/") or not norm_path(remote, root_ok=True):
                remote = remote.rstrip("/") + "/" + os.path.basename(local_path)
            batch.put_file(local_path, remote)
    click.echo(f"uploaded {local_path} to {name}:{remote_path}")


@volume.command("get")
@click.argument("name")
@click.argument("remote_path")
@click.argument("local_destination", default=".")
@click.option("-f", "--force", is_flag=True, help="Overwrite local files that exist.")
def get(name: str, remote_path: str, local_destination: str, force: bool) -> None:
    """Download REMOTE_PATH (a file or a directory) from volume NAME to LOCAL_DESTINATION
    ("-": standard output)."""
    vol = Volume.from_name(name)
    src = norm_path(remote_path, root_ok=True)
    entries = [e for e in vol.iterdir(src, recursive=True) if e.type == FileEntryType.FILE]
    if local_destination == "-":
        for e in entries:
            for chunk in vol.read_file(e.path):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    single = len(entries) == 1 and entries[0].path == src
    for e in entries:
        if single:
            dest = local_destination
            if os.path.isdir(dest):
                dest = os.path.join(dest, os.path.basename(e.path))
        else:
            rel = e.path[len(src) :].lstrip("/") if src else e.path
            dest = os.path.join(local_destination, os.path.basename(src) if src else "", rel)
        if os.path.exists(dest) and not force:
            raise exc.InvalidError(f"{dest} exists: pass --force to overwrite it")
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        tmp = dest + ".strato-part"
        with open(tmp, "wb") as f:
            vol.read_file_into_fileobj(e.path, f)
        os.replace(tmp, dest)
    click.echo(f"downloaded {len(entries)} file(s) to {local_destination}")


@volume.command("rm")
@click.argument("name")
@click.argument("remote_path")
@click.option("-r", "--recursive", is_flag=True, help="Remove a directory and its files.")
def rm(name: str, remote_path: str, recursive: bool) -> None:
    """Remove REMOTE_PATH from volume NAME."""
    Volume.from_name(name).remove_file(remote_path, recursive=recursive)
    click.echo(f"removed {name}:{remote_path}")


@volume.command("cp")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Copy directories too.")
def cp(name: str, paths: tuple[str, ...], recursive: bool) -> None:
    """Copy files within volume NAME: SRC... DST."""
    if len(paths) < 2:
        raise exc.InvalidError("cp needs one or more SRC paths and a DST path")
    *srcs, dst = paths
    Volume.from_name(name).copy_files(srcs, dst, recursive=recursive)
    click.echo(f"copied {len(srcs)} path(s) to {name}:{dst}")


@volume.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(name: str, yes: bool) -> None:
    """Delete volume NAME and all its files."""
    check_name(name)
    if not yes:
        click.confirm(f"Delete volume {name} and all its files?", abort=True)
    Volume.delete(name)
    click.echo(f"deleted volume {name}")
