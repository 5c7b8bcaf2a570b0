"""What the builder borrows from the host: its Debian mirror and its pip configuration.

Builds reach the same package sources as the host: debootstrap uses the host's apt mirror,
and pip/uv inside the image get the host's index URLs, find-links, trusted hosts, CA bundle
and constraints. Local paths among those (``file://`` indexes, wheel directories, the CA
bundle) are bound read-only into the build sandbox under :data:`HOST_MOUNT`.
"""

from __future__ import annotations

import configparser
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from strato import settings

DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_MOUNT = "/tmp/.strato-host"
"""Where host paths appear inside a build (on the sandbox's /tmp, never in a layer)."""


@dataclass(frozen=True)
class Bind:
    """A host path bound into the build sandbox (read-only unless ``writable``)."""

    host: str
    dest: str
    writable: bool = False


def _in_sandbox(host_path: str) -> str:
    return HOST_MOUNT + os.path.normpath(host_path)


# ---------------------------------------------------------------------------------------
# apt mirror


def _deb822_uris(text: str) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        found.extend((uri, suites) for uri in fields.get("uris", "").split())
    return found


def _one_line_uris(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 3 and parts[0] == "deb":
            rest = parts[1:]
            if rest[0].startswith("["):  # options: "[arch=amd64 signed-by=...]"
                while rest and not rest[0].endswith("]"):
                    rest = rest[1:]
                rest = rest[1:]
            if len(rest) >= 2:
                found.append((rest[0], [rest[1]]))
    return found


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror (``STRATO_DEBIAN_MIRROR`` overrides), for debootstrap."""
    override = settings.DEBIAN_MIRROR.get()
    if override:
        return override.rstrip("/")
    entries: list[tuple[str, list[str]]] = []
    try:
        entries += _one_line_uris((apt_dir / "sources.list").read_text())
    except OSError:
        pass
    d = apt_dir / "sources.list.d"
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        try:
            entries += _deb822_uris(f.read_text())
        except OSError:
            pass
    for f in sorted(d.glob("*.list")) if d.is_dir() else []:
        try:
            entries += _one_line_uris(f.read_text())
        except OSError:
            pass
    for uri, suites in entries:
        if "security" in uri or not uri.startswith(("http://", "https://")):
            continue
        if any("-" not in s for s in suites):  # a plain release, not -updates/-security
            return uri.rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------------------------------
# pip configuration

_PIP_KEYS = (
    "index-url",
    "extra-index-url",
    "find-links",
    "trusted-host",
    "cert",
    "constraint",
    "timeout",
    "default-timeout",
    "no-index",
)


def _pip_config_files() -> list[Path]:
    """pip's configuration files, lowest priority first (global, user, site, env)."""
    if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d]
    files.append(Path("/etc/pip.conf"))
    home = Path.home()
    files.append(home / ".pip" / "pip.conf")
    xdg_home = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    files.append(Path(xdg_home) / "pip" / "pip.conf")
    files.append(Path(sys.prefix) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return files


def host_pip_settings() -> dict[str, str]:
    """The host's effective pip settings among :data:`_PIP_KEYS` (files, then ``PIP_*``)."""
    settings: dict[str, str] = {}
    for path in _pip_config_files():
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key in _PIP_KEYS:
                    if parser.has_option(section, key):
                        settings[key] = parser.get(section, key)
    for key in _PIP_KEYS:
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value is not None:
            settings[key] = value
    if "default-timeout" in settings and "timeout" not in settings:
        settings["timeout"] = settings["default-timeout"]
    settings.pop("default-timeout", None)
    return settings


@dataclass
class PackageSources:
    """pip and uv settings for a build, with the host paths they need bound in."""

    pip_env: dict[str, str] = field(default_factory=dict)
    uv_env: dict[str, str] = field(default_factory=dict)
    binds: list[Bind] = field(default_factory=list)


def _local_path(location: str) -> str | None:
    if location.startswith("file://"):
        return location[len("file://") :] or None
    if location.startswith("/"):
        return location
    return None


class _Binder:
    def __init__(self) -> None:
        self.binds: dict[str, Bind] = {}

    def bind(self, host_path: str) -> str | None:
        """Bind ``host_path`` in; returns its path inside, or None if it does not exist."""
        if not os.path.exists(host_path):
            return None
        dest = _in_sandbox(host_path)
        self.binds.setdefault(dest, Bind(host_path, dest))
        return dest

    def location(self, location: str, *, index: bool) -> str | None:
        """Rewrite a URL or path; a local index ``.../simple`` brings its parent along
        (indexes link to ``../../files/...``)."""
        path = _local_path(location)
        if path is None:
            return location
        path = os.path.normpath(path)
        root = os.path.dirname(path) if index and os.path.basename(path) == "simple" else path
        if self.bind(root) is None or not os.path.exists(path):
            return None
        inside = _in_sandbox(path)
        return "file://" + inside if location.startswith("file://") else inside


def package_sources() -> PackageSources:
    """pip and uv environment variables that reproduce the host's pip configuration."""
    settings = host_pip_settings()
    binder = _Binder()
    pip: dict[str, str] = {}
    uv: dict[str, str] = {"UV_INDEX_STRATEGY": "unsafe-best-match"}

    def locations(key: str, index: bool) -> list[str]:
        out = []
        for loc in settings.get(key, "").split():
            new = binder.location(loc, index=index)
            if new is not None:
                out.append(new)
        return out

    if index := locations("index-url", True)[:1]:
        pip["PIP_INDEX_URL"] = uv["UV_INDEX_URL"] = index[0]
    if extra := locations("extra-index-url", True):
        pip["PIP_EXTRA_INDEX_URL"] = uv["UV_EXTRA_INDEX_URL"] = " ".join(extra)
    if links := locations("find-links", False):
        pip["PIP_FIND_LINKS"] = " ".join(links)
        uv["UV_FIND_LINKS"] = ",".join(links)
    if hosts := settings.get("trusted-host", "").split():
        pip["PIP_TRUSTED_HOST"] = uv["UV_INSECURE_HOST"] = " ".join(hosts)
    if "cert" in settings and (cert := binder.bind(settings["cert"])):
        pip["PIP_CERT"] = uv["SSL_CERT_FILE"] = cert
    constraints = [c for c in map(binder.bind, settings.get("constraint", "").split()) if c]
    if constraints:
        pip["PIP_CONSTRAINT"] = uv["UV_CONSTRAINT"] = " ".join(constraints)
    if settings.get("timeout"):
        pip["PIP_DEFAULT_TIMEOUT"] = uv["UV_HTTP_TIMEOUT"] = settings["timeout"]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        pip["PIP_NO_INDEX"] = "1"
        uv["UV_NO_INDEX"] = "1"
    return PackageSources(pip, uv, list(binder.binds.values()))
