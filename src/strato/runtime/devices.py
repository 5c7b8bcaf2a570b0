"""The NVIDIA device nodes and ``CUDA_VISIBLE_DEVICES`` of a container with some GPUs.

An isolated container sees only its own GPUs' nodes (``/dev/nvidia<i>``) plus the shared
control nodes. CUDA enumerates only the GPUs whose node it can open, numbered from 0, so
``CUDA_VISIBLE_DEVICES`` names them by UUID where the driver reports UUIDs (which holds
whatever the numbering), else as ``0..n-1``.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
DRIVER_GPUS = "/proc/driver/nvidia/gpus"


def gpu_device_nodes(indices: list[int], dev: str = "/dev") -> list[str]:
    """Host paths to bind: ``<dev>/nvidia<i>`` for each index (all must exist), then the
    shared nodes that exist. Raises ``FileNotFoundError`` for a missing GPU node."""
    if not indices:
        return []
    nodes = []
    for i in indices:
        node = os.path.join(dev, f"nvidia{i}")
        if not os.path.exists(node):
            raise FileNotFoundError(f"GPU {i} was assigned but {node} does not exist")
        nodes.append(node)
    nodes += [p for n in SHARED_NODES if os.path.exists(p := os.path.join(dev, n))]
    return nodes


def _uuids_by_minor(driver_gpus: str) -> dict[int, str]:
    found: dict[int, str] = {}
    try:
        entries = os.listdir(driver_gpus)
    except OSError:
        return found
    for entry in entries:
        fields: dict[str, str] = {}
        try:
            text = (Path(driver_gpus) / entry / "information").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        minor, uuid = fields.get("Device Minor", ""), fields.get("GPU UUID", "")
        if minor.isdigit() and uuid.startswith("GPU-"):
            found[int(minor)] = uuid
    return found


def cuda_visible_devices(indices: list[int], driver_gpus: str = DRIVER_GPUS) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a container that sees only the GPUs ``indices``."""
    uuids = _uuids_by_minor(driver_gpus)
    if indices and all(i in uuids for i in indices):
        return ",".join(uuids[i] for i in indices)
    return ",".join(str(n) for n in range(len(indices)))
