"""Cold starts: a no-op function after scale-to-zero, and memory snapshots.

(a) ``cold_start_noop``: the first ``noop.remote()`` after the function scaled to zero
(``scaledown_window=2``; the benchmark waits until the app has no container left, so no
container runs and the code is cached on the node), from the call to its result. Baseline:
a bare ``python -c "import json"`` subprocess (stdout/stderr piped and read, waited for),
timed in the same run, interleaved with the strato rounds. Target: strato p50 <= 2x bare p50.

(b) ``cold_start_snapshot``: the first call after scale-to-zero of a class whose
``@enter(snap=True)`` imports numpy and scipy, with ``enable_memory_snapshot=True`` and
without (the same class otherwise), interleaved. Target: without / with >= 3.

(c) ``cold_start_image_noop``: as (a) for a function with a ``debian_slim()`` image (forked
from the image's zygote), against the same bare baseline. Target: strato p50 <= 2x bare p50.

(d) ``cold_start_image_snapshot``: as (b) for classes in a ``debian_slim()`` image with numpy
and scipy installed (the image's Python, not the worker's). Target: without / with >= 10.

Images are built once in ``$STRATO_IMAGE_CACHE`` (default here: the tests' shared cache,
``/tmp/strato-test-image-cache``; a first build takes a minute or two) before any timing.
``--skip-image`` leaves (c) and (d) out.

Runs against a fresh embedded control plane with the worker's default runtime
(``STRATO_RUNTIME`` to choose). One JSON line per result on stdout:

    .venv/bin/python benchmarks/bench_cold_start.py [--rounds 10] [--snapshot-rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import emit, latency_summary, note, strato_env

import strato

app = strato.App("bench-cold-start")


@app.function(scaledown_window=2)
def noop(x):
    return x


def _heavy_methods() -> tuple:
    """A snap hook that imports numpy and scipy, and a method (fresh functions per class:
    the container reads a class's own attributes)."""

    def load(self) -> None:
        import numpy
        import scipy
        import scipy.linalg
        import scipy.optimize
        import scipy.sparse
        import scipy.stats

        self.np, self.sp = numpy, scipy
        self.matrix = numpy.eye(64)

    def solve(self, x: float) -> float:
        import scipy.linalg

        return float(scipy.linalg.solve(self.matrix, self.np.full(64, x))[0])

    return strato.enter(snap=True)(load), strato.method()(solve)


@app.cls(enable_memory_snapshot=True, scaledown_window=2)
class WithSnapshot:
    load, solve = _heavy_methods()


@app.cls(scaledown_window=2)
class WithoutSnapshot:
    load, solve = _heavy_methods()


IMAGE_CACHE = "/tmp/strato-test-image-cache"  # tests/integration/test_image_build.py's
os.environ.setdefault("STRATO_IMAGE_CACHE", IMAGE_CACHE)  # read by the worker it starts

slim = strato.Image.debian_slim()
scientific = strato.Image.debian_slim().pip_install("numpy", "scipy")


@app.function(image=slim, scaledown_window=2)
def noop_in_image(x):
    return x


@app.cls(image=scientific, enable_memory_snapshot=True, scaledown_window=2)
class ImageWithSnapshot:
    load, solve = _heavy_methods()


@app.cls(image=scientific, scaledown_window=2)
class ImageWithoutSnapshot:
    load, solve = _heavy_methods()


BARE = [sys.executable, "-c", "import json"]


def bare() -> float:
    t0 = time.perf_counter()
    subprocess.run(BARE, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    return time.perf_counter() - t0


def scaled_to_zero(app_id: str, timeout: float = 60.0) -> None:
    from strato.client import session
    from strato.protocol import messages as m

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = session.api().call(
            "GET", "/containers", None, m.ContainerList, params={"app": app_id}
        )
        if not [c for c in listing.containers if c.state != "stopped"]:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the app's containers did not scale down within {timeout:g}s")


def timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def runtime_name() -> str:
    from strato.runtime import get_runtime

    return get_runtime(None).name


def _has_scientific_stack() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("numpy", "scipy"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--snapshot-rounds", type=int, default=4)
    ap.add_argument("--skip-snapshot", action="store_true")
    ap.add_argument("--skip-image", action="store_true")
    args = ap.parse_args()
    runtime = runtime_name()
    note(f"runtime: {runtime}")
    kinds = ("noop", "bare", "with", "without", "image_noop", "image_bare")
    samples: dict[str, list[float]] = {k: [] for k in (*kinds, "image_with", "image_without")}
    images = not args.skip_image
    # (b) runs the classes in this Python: without numpy and scipy here it is left out
    host_snapshot = not args.skip_snapshot and _has_scientific_stack()
    if not args.skip_snapshot and not host_snapshot:
        note("numpy/scipy are not installed in this Python: cold_start_snapshot left out")
    with strato_env(), app.run(quiet=True) as running:
        assert noop.remote(1) == 1  # the node has the code; the zygote is warm
        if host_snapshot:  # the first of each: the snapshot is taken here
            WithSnapshot().solve.remote(1.0)
            WithoutSnapshot().solve.remote(1.0)
        if images:  # the images are built (or found in the cache) here, untimed
            note(f"images in {os.environ['STRATO_IMAGE_CACHE']} (built if missing)")
            assert noop_in_image.remote(1) == 1
            if not args.skip_snapshot:
                ImageWithSnapshot().solve.remote(1.0)
                ImageWithoutSnapshot().solve.remote(1.0)
        for i in range(args.rounds):
            scaled_to_zero(running.app_id)
            samples["bare"].append(bare())
            samples["noop"].append(timed(lambda i=i: noop.remote(i)))
            note(f"noop round {i}: {samples['noop'][-1] * 1e3:.1f} ms")
        for i in range(args.rounds if images else 0):
            scaled_to_zero(running.app_id)
            samples["image_bare"].append(bare())
            samples["image_noop"].append(timed(lambda i=i: noop_in_image.remote(i)))
            note(f"image noop round {i}: {samples['image_noop'][-1] * 1e3:.1f} ms")
        pairs: list[tuple[str, str, type, type]] = []
        if host_snapshot:
            pairs.append(("with", "without", WithSnapshot, WithoutSnapshot))
        if images:
            pairs.append(("image_with", "image_without", ImageWithSnapshot, ImageWithoutSnapshot))
        for w, wo, snapped, plain in pairs:
            for i in range(0 if args.skip_snapshot else args.snapshot_rounds):
                scaled_to_zero(running.app_id)
                samples[w].append(timed(lambda snapped=snapped: snapped().solve.remote(2.0)))
                samples[wo].append(timed(lambda plain=plain: plain().solve.remote(2.0)))
                note(
                    f"{w} round {i}: with {samples[w][-1] * 1e3:.1f} ms, "
                    f"without {samples[wo][-1] * 1e3:.1f} ms"
                )
    ok = True
    for name, strato_key, bare_key in (
        ("cold_start_noop", "noop", "bare"),
        ("cold_start_image_noop", "image_noop", "image_bare"),
    ):
        if not samples[strato_key]:
            continue
        noop_ms = statistics.median(samples[strato_key]) * 1e3
        bare_ms = statistics.median(samples[bare_key]) * 1e3
        ratio = noop_ms / bare_ms
        ok = ok and ratio <= 2.0
        emit(
            {
                "benchmark": name,
                "runtime": runtime,
                "rounds": args.rounds,
                "strato_p50_ms": round(noop_ms, 2),
                "bare_p50_ms": round(bare_ms, 2),
                "ratio": round(ratio, 3),
                "target": "<= 2.0",
                "pass": ratio <= 2.0,
                "strato": latency_summary(samples[strato_key]),
                "bare": latency_summary(samples[bare_key]),
            }
        )
    for name, w, wo, target in (
        ("cold_start_snapshot", "with", "without", 3.0),
        ("cold_start_image_snapshot", "image_with", "image_without", 10.0),
    ):
        if not samples[w]:
            continue
        with_ms = statistics.median(samples[w]) * 1e3
        without_ms = statistics.median(samples[wo]) * 1e3
        speedup = without_ms / with_ms
        ok = ok and speedup >= target
        emit(
            {
                "benchmark": name,
                "runtime": runtime,
                "rounds": args.snapshot_rounds,
                "with_snapshot_p50_ms": round(with_ms, 2),
                "without_snapshot_p50_ms": round(without_ms, 2),
                "speedup": round(speedup, 3),
                "target": f">= {target:g}",
                "pass": speedup >= target,
            }
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
