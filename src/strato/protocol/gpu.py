"""GPU requests: parsing Modal's ``gpu=`` argument and naming devices.

``gpu=`` accepts ``None``, ``"TYPE"``, ``"TYPE:COUNT"``, ``"any"``, ``"any:COUNT"``, or a
list of those strings, tried in order as fallbacks. Types are case-insensitive and are
canonicalised to the names in :data:`KNOWN_GPU_TYPES`.
"""

from __future__ import annotations

import re

import msgspec

from strato.exceptions import InvalidError

KNOWN_GPU_TYPES: tuple[str, ...] = (
    "T4",
    "L4",
    "A10",
    "A10G",
    "A40",
    "V100",
    "RTX-4090",
    "RTX-A6000",
    "L40",
    "L40S",
    "A100-40GB",
    "A100-80GB",
    "H100",
    "H200",
    "B200",
)
"""Canonical GPU type names, as used in requests, node inventories and messages."""

MAX_GPU_COUNT = 8
ANY_GPU = "any"

_ALIASES: dict[str, str] = {
    "A100": "A100-40GB",
    "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB",
    "H100!": "H100",  # Modal: "H100 exactly, never upgraded"; strato never upgrades.
    "RTX4090": "RTX-4090",
    "4090": "RTX-4090",
    "A6000": "RTX-A6000",
    "RTXA6000": "RTX-A6000",
}

_CANONICAL_BY_UPPER: dict[str, str] = {name.upper(): name for name in KNOWN_GPU_TYPES}

# Tokens of an ``nvidia-smi --query-gpu=name`` string that identify a type on their own.
_DEVICE_TOKENS: dict[str, str] = {
    "T4": "T4",
    "L4": "L4",
    "A10": "A10",
    "A10G": "A10G",
    "A40": "A40",
    "V100": "V100",
    "4090": "RTX-4090",
    "A6000": "RTX-A6000",
    "L40": "L40",
    "L40S": "L40S",
    "H100": "H100",
    "H200": "H200",
    "B200": "B200",
}


class GpuRequest(msgspec.Struct, frozen=True):
    """One way to satisfy a GPU need: ``count`` devices of ``type`` (``None`` = any type)."""

    type: str | None
    count: int = 1


def parse_gpu(spec: str | list[str] | None) -> list[GpuRequest]:
    """Parse a ``gpu=`` argument into ordered fallbacks; ``[]`` means no GPU."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [_parse_one(spec)]
    if isinstance(spec, list | tuple):
        if not spec:
            raise InvalidError(f"gpu=[] names no GPU; pass gpu=None for none. {_usage()}")
        return [_parse_one(item) for item in spec]
    raise InvalidError(f"Invalid gpu={spec!r}: expected a string or a list of strings. {_usage()}")


def gpu_request_str(req: GpuRequest) -> str:
    """Render a request in the ``TYPE[:COUNT]`` form that :func:`parse_gpu` accepts."""
    name = req.type if req.type is not None else ANY_GPU
    return name if req.count == 1 else f"{name}:{req.count}"


def canonical_gpu_name(name: str) -> str | None:
    """Map a device name printed by ``nvidia-smi`` (or a canonical name) to a known type."""
    tokens = [t for t in re.split(r"[\s\-_]+", name.strip().upper()) if t]
    if "A100" in tokens:
        return "A100-80GB" if "80GB" in tokens else "A100-40GB"
    for token in tokens:
        if token in _DEVICE_TOKENS:
            return _DEVICE_TOKENS[token]
    return None


def _parse_one(item: object) -> GpuRequest:
    if not isinstance(item, str):
        raise InvalidError(f"Invalid gpu {item!r}: expected a string. {_usage()}")
    type_part, sep, count_part = item.strip().partition(":")
    gpu_type = _canonical_type(type_part.strip(), item)
    count = _parse_count(count_part.strip()) if sep else 1
    if count is None:
        raise InvalidError(
            f"Invalid gpu {item!r}: count must be a whole number from 1 to {MAX_GPU_COUNT}. "
            f"{_usage()}"
        )
    return GpuRequest(type=gpu_type, count=count)


def _canonical_type(text: str, item: str) -> str | None:
    """Canonical name of ``text``, or ``None`` for "any"; unknown names are refused."""
    upper = text.upper()
    if upper == ANY_GPU.upper():
        return None
    canonical = _CANONICAL_BY_UPPER.get(upper) or _ALIASES.get(upper)
    if canonical is None:
        raise InvalidError(f"Invalid gpu {item!r}: unknown GPU type {text!r}. {_usage()}")
    return canonical


def _parse_count(text: str) -> int | None:
    if not re.fullmatch(r"[0-9]+", text):
        return None
    count = int(text)
    return count if 1 <= count <= MAX_GPU_COUNT else None


def _usage() -> str:
    return (
        f'Use "TYPE[:COUNT]" (COUNT 1..{MAX_GPU_COUNT}), or a list of them as fallbacks; '
        f"TYPE is one of: {ANY_GPU}, {', '.join(KNOWN_GPU_TYPES)}."
    )
