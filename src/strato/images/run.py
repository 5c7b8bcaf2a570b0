"""Run one command in a built image (tests, debugging, ``strato image shell``-like tools).

The reference for runtimes: the image's layers are overlay ``lowerdir``s (read-only, top
first), a throw-away directory is the ``upperdir``, and bwrap runs the command over the
merged tree with the image's ``env`` and ``workdir``. The worker's bwrap/gVisor runtimes
do the same with their own isolation and limits.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from strato.images.builder import BuiltImage
from strato.images.cache import remove_tree
from strato.images.hostconf import Bind
from strato.images.sandbox import MAX_OVERLAY_OPTS, bwrap_args, overlay_command


def overlay_mount_options(layers: Sequence[str], upper: str, work: str) -> tuple[str, str]:
    """``(cwd, options)`` for ``mount -t overlay`` over ``layers`` (bottom first): the
    lowerdirs are relative to their common parent, which the mount must run in, so that
    many layers fit in the one page that mount(2) accepts."""
    parent = os.path.commonpath([os.path.dirname(p) for p in layers])
    lower = ":".join(os.path.relpath(p, parent) for p in reversed(layers))
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(opts) > MAX_OVERLAY_OPTS:
        raise ValueError(f"too many layers ({len(layers)}) for one overlay mount")
    return parent, opts


def run_in_image(
    image: BuiltImage,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    binds: Sequence[Bind] = (),
    timeout: float = 60.0,
    network: bool = True,
    scratch_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``image`` as root (needs root) and return its output (stdout and
    stderr apart). What it writes is thrown away. ``env`` adds to the image's env."""
    scratch = Path(tempfile.mkdtemp(prefix="strato-run-", dir=scratch_dir))
    try:
        for sub in ("upper", "work", "merged"):
            (scratch / sub).mkdir()
        cwd, opts = overlay_mount_options(
            image.layers, str(scratch / "upper"), str(scratch / "work")
        )
        merged = str(scratch / "merged")
        inner = bwrap_args(
            merged,
            list(argv),
            env={**image.env, **(env or {})},
            binds=binds,
            cwd=image.workdir or "/",
            hostname="strato",
            all_caps=False,
            network=network,
        )
        return subprocess.run(
            overlay_command(cwd, opts, merged, inner),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    finally:
        remove_tree(scratch)
