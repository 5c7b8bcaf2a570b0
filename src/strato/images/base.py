"""The base layer: a Debian root filesystem made by debootstrap, with Debian's python3."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from strato.images.errors import ImageBuildError
from strato.images.sandbox import run_logged
from strato.protocol.images import DEFAULT_PATH, DebianSlim

BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates", "python-is-python3")
IMAGE_PYTHON = "/usr/bin/python3"


def require_root_and_tools(*tools: str) -> None:
    """Refuse to build where the build cannot work, saying what to do."""
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building images needs root (debootstrap, overlay mounts, apt inside the image); "
            "run the worker agent as root"
        )
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageBuildError(
            f"building images needs {', '.join(missing)} on this machine; install it with "
            "`apt-get install -y bubblewrap debootstrap util-linux`"
        )


def debootstrap_command(step: DebianSlim, root: Path, mirror: str) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        "--include=" + ",".join(BASE_PACKAGES),
        step.release,
        str(root),
        mirror,
    ]


def build_base(
    step: DebianSlim,
    root: Path,
    *,
    mirror: str,
    on_line: Callable[[str], None],
    timeout: float,
) -> str:
    """debootstrap ``step.release`` into ``root`` and tidy it into a layer; returns the
    command it ran. Raises :class:`ImageBuildError` on failure."""
    require_root_and_tools("debootstrap", "unshare", "bwrap")
    argv = debootstrap_command(step, root, mirror)
    # dpkg without an fsync per file (as Docker's Debian images do): a layer is only
    # committed after its build succeeded, so a crash mid-build cannot leave a torn one
    dpkg_cfg = root / "etc/dpkg/dpkg.cfg.d"
    dpkg_cfg.mkdir(parents=True)
    (dpkg_cfg / "strato-unsafe-io").write_text("force-unsafe-io\n")
    # its own mount namespace: debootstrap mounts /proc etc. in the target, and any mount
    # it leaves behind on failure goes away with the namespace
    wrapped = ["unshare", "--mount", "--propagation", "private", "--", *argv]
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    result = run_logged(wrapped, on_line, timeout=timeout, env=env)
    command = " ".join(argv)
    if result.returncode != 0 or result.timed_out:
        how = (
            f"timed out after {timeout:.0f}s"
            if result.timed_out
            else f"exited with code {result.returncode}"
        )
        tail = "\n".join(result.tail)
        raise ImageBuildError(
            f"debian_slim({step.python_version}): `{command}` {how}. Last output:\n{tail}",
            command=command,
            output_tail=tail,
        )
    finish_base(root, step)
    return command


def finish_base(root: Path, step: DebianSlim) -> None:
    """Drop downloaded packages and indexes, neutralise host files, check the Python."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin"):
        for f in root.glob(pattern):
            f.unlink()
    lists = root / "var/lib/apt/lists"
    for f in lists.iterdir() if lists.is_dir() else []:
        if f.is_file() and f.name != "lock":
            f.unlink()
    # bound over at run time; must exist so that binding it never writes into a layer
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text("")
    (root / "etc/hostname").write_text("strato\n")
    for d in ("tmp", "proc", "dev", "sys", "run", "opt"):
        (root / d).mkdir(exist_ok=True)
    python = root / "usr/bin" / f"python{step.python_version}"
    if not python.exists():
        found = sorted(p.name for p in (root / "usr/bin").glob("python3.*"))
        raise ImageBuildError(
            f"debian_slim: Debian {step.release} installed {found or 'no python3'}, not "
            f"python{step.python_version}"
        )
