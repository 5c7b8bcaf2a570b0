"""Image builds: the cold build of ``debian_slim()`` and of a numpy layer, and the rebuild
of a cached image (target: a no-op under 100 ms), in one run.

The baseline of the cached rebuild is the cold build of the same image measured just
before it; the figures that matter are the rebuild's absolute time (no process, no
network) and the ratio. Uses a fresh, temporary cache unless ``--cache DIR`` is given
(a warm cache then skips the cold figures' meaning: they are reported as measured).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, note

from strato.images import build
from strato.protocol.images import ImageSpec, PipInstall, debian_slim


def _no_blobs(key: str) -> bytes:
    raise AssertionError(f"this image has no local files (asked for {key})")


def _timed_build(spec: ImageSpec, cache: Path) -> float:
    t0 = time.perf_counter()
    build(spec, cache, fetch_blob=_no_blobs, log=lambda line: None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", help="build cache to use (default: a fresh temporary one)")
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="strato-bench-img-"))
    try:
        base = ImageSpec([debian_slim()])
        with_numpy = ImageSpec([debian_slim(), PipInstall(["numpy"])])
        note(f"building debian_slim() in {cache} (debootstrap: a minute or two)")
        cold_base = _timed_build(base, cache)
        cold_numpy = _timed_build(with_numpy, cache)
        rebuilds = [_timed_build(with_numpy, cache) for _ in range(20)]
        cached_ms = statistics.median(rebuilds) * 1000
        emit(
            {
                "benchmark": "image_build_cold",
                "debian_slim_s": round(cold_base, 1),
                "numpy_layer_s": round(cold_numpy, 1),
                "cache": "fresh" if not args.cache else "given",
            }
        )
        emit(
            {
                "benchmark": "image_build_cached",
                "p50_ms": round(cached_ms, 2),
                "max_ms": round(max(rebuilds) * 1000, 2),
                "ratio_to_cold_numpy_layer": round(cached_ms / 1000 / cold_numpy, 5),
                "target": "p50_ms < 100",
                "pass": cached_ms < 100,
            }
        )
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
