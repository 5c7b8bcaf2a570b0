"""The native sandbox agent (``strato/container/native/*.c``): the same behaviour and the
same frames as the Python agent (:mod:`strato.container.sandbox_agent`), as one static
binary. Under gVisor's ptrace platform every system call of a sandbox's start costs tens
of microseconds, and an interpreter's start with the agent's imports was most of a
sandbox's time to its first output; the binary starts in about 40 system calls.

The worker compiles it on first use with ``$CC`` (default ``cc``; ``-O2 -static``) into
the machine's cache (``${XDG_CACHE_HOME:-~/.cache}/strato/sandbox-agent/<sha256 of the
sources, compiler and flags>/``), under a file lock and with an atomic rename, so every
worker agent of the machine (whatever its ``STRATO_HOME``) shares one build. Where it
does not build (no compiler, no static libc) the worker logs why once and sandboxes run
the Python agent. ``STRATO_SANDBOX_AGENT`` forces one or the other.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import subprocess
import threading
from pathlib import Path

from strato import settings
from strato.exceptions import InvalidError

log = logging.getLogger("strato.worker")

SOURCE_DIR = Path(__file__).resolve().parent.parent / "container" / "native"
FLAGS = ["-O2", "-static", "-pthread", "-Wall", "-Wextra", "-Werror", "-s"]
BINARY = "strato-sandbox-agent"
BUILD_TIMEOUT_S = 120.0

_lock = threading.Lock()
_built: dict[tuple[str, str], Path | str] = {}  # (cache, compiler) -> binary, or why not


def sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def source_key(cc: list[str]) -> str:
    """What the binary is built from: the sources, the compiler's command and the flags."""
    h = hashlib.sha256()
    h.update(repr((cc, FLAGS)).encode())
    for p in sources():
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def _build(cache: Path, cc: list[str]) -> Path:
    """The binary, compiled here unless the cache has it; raises ``OSError`` or
    ``subprocess.CalledProcessError`` (its output says why) where it does not build."""
    folder = cache / "sandbox-agent" / source_key(cc)
    binary = folder / BINARY
    if binary.is_file():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per machine; the others wait for it
        if binary.is_file():
            return binary
        log.info("building the native sandbox agent with %s (once a machine) in %s", cc[0], folder)
        tmp = folder / f".{BINARY}.tmp-{os.getpid()}"
        try:
            subprocess.run(
                [*cc, *FLAGS, "-o", str(tmp), *(str(p) for p in sources() if p.suffix == ".c")],
                check=True,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            os.chmod(tmp, 0o755)  # (the container's user runs it)
            os.chmod(folder, 0o755)
            os.rename(tmp, binary)
        finally:
            tmp.unlink(missing_ok=True)
        _prune(folder.parent, keep=folder)
    return binary


def _prune(parent: Path, keep: Path, min_age_s: float = 7 * 86400.0) -> None:
    """Builds of other sources (earlier versions) made over a week ago: a sandbox that
    runs one has it bound (its file lives on while bound)."""
    import shutil
    import time

    for old in parent.iterdir():
        try:
            if old != keep and old.is_dir() and time.time() - old.stat().st_mtime > min_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def channel_supported(address: str) -> bool:
    """Whether the native agent dials this channel address: ``unix:``, or ``tcp:`` with
    an IP address or ``localhost`` (it resolves no names)."""
    import ipaddress

    if address.startswith("unix:"):
        return True
    host = address[4:].rpartition(":")[0].strip("[]") if address.startswith("tcp:") else ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return True


def machine_cache() -> Path:
    """``$XDG_CACHE_HOME/strato``, else ``~/.cache/strato``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "strato"


def agent_binary(cache: Path | None = None) -> Path | None:
    """The native agent's binary for this machine, or ``None``: the Python agent (asked for
    with ``STRATO_SANDBOX_AGENT=python``, or the binary does not build here: logged once).
    With ``STRATO_SANDBOX_AGENT=native`` a binary that does not build raises
    ``InvalidError`` with why."""
    wanted = settings.SANDBOX_AGENT.get()
    if wanted == "python":
        return None
    cc = compiler()
    cache = cache or machine_cache()
    key = (str(cache), " ".join(cc))
    with _lock:
        got = _built.get(key)
        if isinstance(got, Path) and not got.is_file():  # (the cache was cleared)
            got = None
        if got is None:
            try:
                got = _build(cache, cc)
            except subprocess.CalledProcessError as e:
                got = f"{cc[0]} failed: {(e.stderr or e.stdout or '').strip()[-2000:]}"
            except subprocess.TimeoutExpired:
                got = f"{cc[0]} took over {BUILD_TIMEOUT_S:g}s"
            except OSError as e:
                got = f"{cc[0]}: {e.strerror or e}"
            if isinstance(got, str):
                log.warning(
                    "the native sandbox agent does not build here (%s): sandboxes run the "
                    "Python agent (install a C compiler and glibc's static library, e.g. "
                    "gcc and libc6-dev, or set STRATO_SANDBOX_AGENT=python)",
                    got,
                )
            _built[key] = got
    if isinstance(got, Path):
        return got
    if wanted == "native":
        raise InvalidError(f"STRATO_SANDBOX_AGENT=native, but the agent does not build: {got}")
    return None


def forget_builds() -> None:
    """Build again at the next call (for tests)."""
    with _lock:
        _built.clear()
