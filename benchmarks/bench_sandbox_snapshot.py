"""``sb.snapshot_filesystem()``: how long a snapshot takes, and the first sandbox of it.

- **snapshot** (per runtime, bwrap and gVisor): a sandbox in ``Image.debian_slim()`` that
  wrote ``--mib`` MiB of random data in ``--files`` files under ``/root``; the time of
  ``snapshot_filesystem()`` (the agent's sync, the node's tar of the writable layer, its
  upload as a blob, the image spec back).
- **first sandbox of the snapshot**: ``Sandbox.create(image=snap)`` until an ``exec``'s
  output arrives, the snapshot's layer built into the image cache on the way; against
  the same for the base image (cached).

Baseline, in the same run: the same files on the host, tarred and hashed
(``tar cf - | sha256sum``), the floor of what a snapshot must do. The base image must
be in the image cache (``STRATO_IMAGE_CACHE``) or it is built first (minutes); the
snapshots' layers (random data) stay in that cache.

    .venv/bin/python benchmarks/bench_sandbox_snapshot.py [--mib 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from _common import emit, note, strato_env

import strato


def host_baseline(mib: int, files: int) -> float:
    tmp = tempfile.mkdtemp(prefix="bench-snap-")
    try:
        for i in range(files):
            with open(f"{tmp}/f{i}", "wb") as f:
                f.write(os.urandom((mib << 20) // files))
        t0 = time.perf_counter()
        subprocess.run(
            f"tar cf - -C {tmp} . | sha256sum", shell=True, check=True, capture_output=True
        )
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def first_output(app: strato.App, image: strato.Image, runtime: str) -> float:
    t0 = time.perf_counter()
    sb = strato.Sandbox.create(app=app, image=image, runtime=runtime, timeout=600)
    try:
        assert sb.exec("true").wait() == 0
        return time.perf_counter() - t0
    finally:
        sb.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtimes", default="bwrap,gvisor")
    args = ap.parse_args()
    names = [n for n in args.runtimes.split(",") if n]
    base = strato.Image.debian_slim()
    write = (
        f"for i in $(seq 1 {args.files}); do "
        f"head -c {(args.mib << 20) // args.files} /dev/urandom > /root/f$i; done"
    )
    rows: dict[str, list[float]] = {"host": []}
    with strato_env():
        app = strato.App.lookup(f"bench-snap-{uuid.uuid4().hex[:6]}", create_if_missing=True)
        first_output(app, base, names[0])  # the base image into the cache (untimed)
        for _ in range(args.runs):
            rows["host"].append(host_baseline(args.mib, args.files))
            for n in names:
                sb = strato.Sandbox.create(app=app, image=base, runtime=n, timeout=600)
                try:
                    assert sb.exec("sh", "-c", write).wait() == 0
                    t0 = time.perf_counter()
                    snap = sb.snapshot_filesystem()
                    rows.setdefault(f"snapshot_{n}", []).append(time.perf_counter() - t0)
                finally:
                    sb.terminate()
                rows.setdefault(f"first_{n}", []).append(first_output(app, snap, n))
                rows.setdefault(f"base_{n}", []).append(first_output(app, base, n))
    note(f"{args.runs} runs; {args.mib} MiB in {args.files} files")

    def med(k: str) -> float:
        v = sorted(rows[k])
        return v[len(v) // 2]

    host = med("host")
    emit({"bench": "sandbox_snapshot", "what": f"host tar | sha256sum of {args.mib} MiB",
          "p50_ms": round(host * 1e3, 1)})  # fmt: skip
    for n in names:
        snap_s, first, cached = med(f"snapshot_{n}"), med(f"first_{n}"), med(f"base_{n}")
        emit({"bench": "sandbox_snapshot", "what": f"snapshot_filesystem of {args.mib} MiB, {n}",
              "p50_ms": round(snap_s * 1e3, 1),
              "ratio_to_host_tar": round(snap_s / host, 2)})  # fmt: skip
        emit({"bench": "sandbox_snapshot", "what": f"first sandbox of the snapshot, {n}",
              "p50_ms": round(first * 1e3, 1),
              "ratio_to_base_image": round(first / cached, 2)})  # fmt: skip


if __name__ == "__main__":
    main()
