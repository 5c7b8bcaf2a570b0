"""The offers catalog: ``offers.csv`` of ``../shared/data/gpu-offers`` (SkyPilot's catalog
of 13 providers), read at run time from ``STRATO_SIM_OFFERS`` (never copied here).

Accelerator names become strato's canonical GPU types where they are one (``A100`` ->
``A100-40GB``, ``H100-SXM`` -> ``H100``, ``RTX4090`` -> ``RTX-4090``...); others are kept
as listed. GCP lists a GPU VM as an accelerator row plus a host-VM row; they are joined
(``a2-highgpu-Ng`` + A100 xN, ``a2-ultragpu-Ng`` + A100-80GB xN, ``a3-highgpu-Ng`` + H100
xN, ``a3-megagpu-Ng`` + H100-MEGA xN) where both are listed, and accelerator rows without a
host row are dropped. Rows with neither an on-demand nor a spot price are dropped.
primeintellect's ``*__SPOT`` types carry their spot price in the price column: they are
sold as spot only.
"""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path

from strato import settings
from strato.protocol.gpu import KNOWN_GPU_TYPES

from .base import Offer

PROVIDERS: tuple[str, ...] = (
    "aws",
    "gcp",
    "lambda",
    "runpod",
    "vast",
    "cudo",
    "hyperbolic",
    "mithril",
    "nebius",
    "primeintellect",
    "seeweb",
    "shadeform",
    "simplepod",
)

_GPU_NAMES: dict[str, str] = {
    "A100": "A100-40GB",
    "A100-80GB-SXM": "A100-80GB",
    "H100-SXM": "H100",
    "H100-MEGA": "H100",
    "H200-SXM": "H200",
    "RTX4090": "RTX-4090",
    "RTXA6000": "RTX-A6000",
    "A6000": "RTX-A6000",
}
_KNOWN = {t.upper(): t for t in KNOWN_GPU_TYPES}
_GCP_HOSTS = {
    "A100": "a2-highgpu-{n}g",
    "A100-80GB": "a2-ultragpu-{n}g",
    "H100": "a3-highgpu-{n}g",
    "H100-MEGA": "a3-megagpu-{n}g",
}


class CatalogMissing(FileNotFoundError):
    pass


def gpu_type(name: str) -> str | None:
    """The canonical type of a catalog accelerator name (None: a CPU-only row)."""
    name = name.strip()
    if not name:
        return None
    return _GPU_NAMES.get(name) or _KNOWN.get(name.upper()) or name


def offers_path() -> Path:
    """``STRATO_SIM_OFFERS``, else ``../shared/data/gpu-offers/offers.csv`` beside the
    checkout (where the project keeps it)."""
    configured = settings.SIM_OFFERS.get()
    if configured is not None:
        return configured
    here = Path(__file__).resolve()
    for up in here.parents:
        candidate = up.parent / "shared" / "data" / "gpu-offers" / "offers.csv"
        if candidate.is_file():
            return candidate
    return Path("../shared/data/gpu-offers/offers.csv").resolve()


def _num(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 else None


def load_offers(path: Path | str | None = None) -> list[Offer]:
    """Every offer of the catalog at ``path`` (default :func:`offers_path`)."""
    p = Path(path) if path is not None else offers_path()
    if not p.is_file():
        raise CatalogMissing(
            f"the offers catalog {p} does not exist: set STRATO_SIM_OFFERS to the path of "
            "gpu-offers/offers.csv"
        )
    return list(_load(str(p), os.stat(p).st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _load(path: str, _mtime: int) -> tuple[Offer, ...]:
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))  # noqa: SIM115
    hosts: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        if r["provider"] == "gcp" and not r["accelerator"] and r["instance_type"]:
            hosts[(r["instance_type"], r["region"], r["zone"])] = r
    out: list[Offer] = []
    for r in rows:
        provider, itype, accel = r["provider"], r["instance_type"], r["accelerator"]
        count = int(r["accelerator_count"] or 0)
        price, spot = _num(r["price_per_hour"]), _num(r["spot_price_per_hour"])
        cpu, mem = _num(r["vcpus"]), _num(r["memory_gib"])
        if provider == "gcp" and accel and not itype:
            pattern = _GCP_HOSTS.get(accel)
            host = hosts.get((pattern.format(n=count), r["region"], r["zone"])) if pattern else None
            if host is None:
                continue
            itype = host["instance_type"]
            cpu, mem = _num(host["vcpus"]), _num(host["memory_gib"])
            hp, hs = _num(host["price_per_hour"]), _num(host["spot_price_per_hour"])
            price = price + hp if price is not None and hp is not None else None
            spot = spot + hs if spot is not None and hs is not None else None
        if provider == "gcp" and not accel and itype.startswith(("a2-", "a3-")):
            continue  # a GPU VM's host, priced with its accelerator row above
        if provider == "primeintellect" and itype.endswith("__SPOT"):
            price, spot = None, price  # its spot price is in the Price column
        if cpu is None or mem is None or (price is None and spot is None):
            continue
        out.append(
            Offer(
                provider=provider,
                instance_type=itype,
                gpu=gpu_type(accel),
                gpu_count=count if accel else 0,
                cpu=cpu,
                memory_gib=mem,
                price=price,
                spot_price=spot,
                region=r["region"],
                zone=r["zone"],
                gpu_memory_gib=_num(r["gpu_memory_gib"]),
            )
        )
    return tuple(out)
