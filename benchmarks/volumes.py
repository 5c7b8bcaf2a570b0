"""Volumes: reading a large file from a mounted volume in a container vs from local disk,
and committing many small files vs writing them with plain Python to a local folder.

One embedded control plane, one app (the ``process`` runtime, which mounts the volume in
the container's own mount namespace: run as root). Every figure is measured in the same
container in one run, the baselines right beside what they compare with:

- ``volume_read``: the container reads ``--size-mib`` from the mounted volume and from a
  copy on its local disk (the same bytes), ``--rounds`` times alternating which goes
  first, each cold (the file's pages dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` first) and warm (read once before, then timed); best round
  of each (warm reads are memory copies: on a loaded machine they wander with the CPU
  left to them). Target: volume >= 80% of local.
- ``volume_commit``: the container writes ``--files`` files of ``--file-bytes`` into the
  mount and commits them (``vol.commit()``: hash, upload of the blocks the control plane
  lacks, one merge); the baseline writes the same files with plain Python into a local
  folder. Target: the commit < 5 s. Also the client's ``batch_upload`` of those files.
- ``volume_container_start``: a new container of a new version of the volume (its blocks
  on the node) vs one without a volume, under ``process``, ``bwrap`` and ``gvisor``.
- ``volume_writable_mount_node``: on this node, without containers, a new version's
  writable mount for the isolating runtimes' user as an overlay over that user's tree of
  hard links vs as a full copy (what those runtimes did before), taking turns.

    .venv/bin/python benchmarks/volumes.py [--size-mib 1024] [--files 10000] [--node-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from _common import emit, note, strato_env

import strato

ISOLATING = ("bwrap", "gvisor")
MOUNT = "/srv"  # a folder that exists on the host (the process runtime binds over it)
app = strato.App("bench-volumes")
vol = strato.Volume.from_name("bench-volume", create_if_missing=True)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_mib_s(path: str, cold: bool) -> float:
    if cold:
        _drop_cache(path)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            total += n
    return total / (1 << 20) / (time.perf_counter() - t0)


@app.function(runtime="process", volumes={MOUNT: vol}, timeout=1800, memory=2048)
def read_bench(rel: str, rounds: int) -> dict:
    src = os.path.join(MOUNT, rel)
    local_dir = tempfile.mkdtemp(prefix="strato-bench-local-")
    local = os.path.join(local_dir, "copy.bin")
    try:
        shutil.copyfile(src, local)
        out: dict[str, float] = {}
        pair = [("volume", src), ("local", local)]
        for r in range(rounds):
            for cold in (True, False):
                kind = "cold" if cold else "warm"
                for name, path in pair if r % 2 == 0 else pair[::-1]:  # either goes first
                    if not cold:
                        _read_mib_s(path, False)  # all of it in the page cache first
                    key = f"{name}_{kind}_mib_s"
                    out[key] = max(out.get(key, 0.0), _read_mib_s(path, cold))
        out["bytes"] = os.path.getsize(src)
        return out
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def _write_files(root: str, n: int, size: int, salt: str) -> float:
    """Write n files of ``size`` bytes (distinct contents); seconds taken."""
    t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        head = f"{salt}:{i}:".encode()
        with open(os.path.join(root, f"{i:05d}.txt"), "wb") as f:
            f.write(head + b"x" * max(0, size - len(head)))
    return time.perf_counter() - t0


@app.function(runtime="process", volumes={MOUNT: vol}, timeout=1800)
def commit_bench(n: int, size: int, tag: str) -> dict:
    local_dir = tempfile.mkdtemp(prefix="strato-bench-local-")
    try:
        local_s = _write_files(local_dir, n, size, tag)
        write_s = _write_files(os.path.join(MOUNT, f"many-{tag}"), n, size, tag)
        t0 = time.perf_counter()
        vol.commit()
        commit_s = time.perf_counter() - t0
        return {"local_write_s": local_s, "volume_write_s": write_s, "commit_s": commit_s}
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


@app.function(runtime="process", volumes={MOUNT: vol}, timeout=1800)
def count_files() -> int:
    return sum(len(files) for _, _, files in os.walk(MOUNT))


@app.function(runtime="process", timeout=1800)
def no_volume() -> int:
    return 0


def _count_and_write(tag: str) -> int:
    """Write into the mount as the container's user (in place into a small file it holds,
    and a new file); how many files it holds."""
    with open(f"{MOUNT}/many-a/00000.txt", "r+b") as f:
        f.write(tag.encode())
    with open(f"{MOUNT}/{tag}.txt", "w") as f:
        f.write(tag)
    return sum(len(files) for _, _, files in os.walk(MOUNT))


def _nothing() -> int:
    return 0


# the isolating runtimes run the container as an unprivileged user: their writable mount
iso_count = {
    rt: app.function(runtime=rt, volumes={MOUNT: vol}, timeout=1800, name=f"count_{rt}")(
        _count_and_write
    )
    for rt in ISOLATING
}
iso_first = app.function(runtime="bwrap", volumes={MOUNT: vol}, timeout=1800)(_nothing)
iso_plain = {
    rt: app.function(runtime=rt, timeout=1800, name=f"plain_{rt}")(_nothing) for rt in ISOLATING
}


def node_writable_mount(n_files: int, file_bytes: int, size_mib: int, rounds: int) -> None:
    """On this node, without containers: a writable mount of a new version for the
    isolating runtimes' user, made as an overlay over that user's tree of hard links vs
    as a full copy (the baseline), taking turns; best round of each."""
    import hashlib
    from pathlib import Path

    from strato.protocol import messages as m
    from strato.worker import volumes as wv
    from strato.worker.mounts import blob_path

    owner = (65534, 65534)
    cache = Path(tempfile.mkdtemp(prefix="strato-bench-node-"))
    try:
        files, fetched = [], {}
        for i in range(n_files):
            data = f"{i}:".encode().ljust(file_bytes, b"x")
            files.append(m.VolumeFile(f"many/{i:05d}.txt", len(data), 0o644, 0.0, [], data))
        keys = []
        for i in range(size_mib // 8 or 1):
            block = i.to_bytes(8, "little") + os.urandom((8 << 20) - 8)
            key = hashlib.sha256(block).hexdigest()
            path = Path(blob_path(str(cache), key))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(block)
            os.chmod(path, 0o444)
            fetched[key] = str(path)
            keys.append(key)
        files.append(m.VolumeFile("big.bin", len(keys) << 23, 0o644, 0.0, keys))
        best = {"copy": float("inf"), "overlay": float("inf")}
        version = 0
        for r in range(rounds + 1):  # round 0 makes the node's files for the user: not timed
            for kind in ("copy", "overlay") if r % 2 else ("overlay", "copy"):
                version += 1
                man = m.VolumeManifest("bench", version, files)
                cid = f"bench-{version}"
                mine = wv.container_dir(cache, cid)
                mine.mkdir(parents=True)
                t0 = time.perf_counter()
                if kind == "copy":
                    wv._own_tree(cache, None, man, fetched, mine / "0", owner)  # type: ignore[arg-type]
                else:
                    got = wv._overlay(cache, None, man, fetched, mine, 0, wv.Prepared(), owner)  # type: ignore[arg-type]
                    if got is None:
                        raise SystemExit("no overlay mounts here")
                took = time.perf_counter() - t0
                if r:
                    best[kind] = min(best[kind], took)
                wv._remove(cache, cid)
        emit(
            {
                "benchmark": "volume_writable_mount_node",
                "files": n_files + 1,
                "bytes": n_files * file_bytes + (len(keys) << 23),
                "overlay_s": round(best["overlay"], 3),
                "copy_s": round(best["copy"], 3),
                "ratio_to_copy": round(best["overlay"] / best["copy"], 3),
                "note": "a new version's writable mount for the isolating runtimes' user: "
                "overlay over the user's tree of hard links vs a full copy (the node's "
                "blocks already there); best of the rounds",
            }
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--file-bytes", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--node-only", action="store_true", help="only the node-level figure")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the process runtime mounts volumes as root: run this as root")
    node_writable_mount(args.files, args.file_bytes, args.size_mib, args.rounds)
    if args.node_only:
        return
    with strato_env():
        try:
            strato.Volume.delete("bench-volume")
        except strato.exceptions.NotFoundError:
            pass
        size = args.size_mib << 20
        note(f"uploading a {args.size_mib} MiB file to the volume")
        with tempfile.TemporaryDirectory() as d:
            big = os.path.join(d, "big.bin")
            with open(big, "wb") as f:
                chunk = os.urandom(1 << 20)
                for i in range(args.size_mib):
                    f.write(i.to_bytes(8, "little") + chunk[8:])
            t0 = time.perf_counter()
            with vol.batch_upload(force=True) as batch:
                batch.put_file(big, "big.bin")
            upload_s = time.perf_counter() - t0
        with app.run(quiet=True):
            t0 = time.perf_counter()
            r = read_bench.remote("big.bin", args.rounds)
            first_call_s = time.perf_counter() - t0
            for kind in ("cold", "warm"):
                vol_mib_s, local_mib_s = r[f"volume_{kind}_mib_s"], r[f"local_{kind}_mib_s"]
                emit(
                    {
                        "benchmark": "volume_read",
                        "cache": kind,
                        "bytes": r["bytes"],
                        "volume_mib_s": round(vol_mib_s, 1),
                        "local_mib_s": round(local_mib_s, 1),
                        "ratio_to_local": round(vol_mib_s / local_mib_s, 3),
                        "target_ratio": 0.8,
                        "ok": vol_mib_s / local_mib_s >= 0.8,
                    }
                )
            emit(
                {
                    "benchmark": "volume_first_call",
                    "bytes": size,
                    "client_upload_s": round(upload_s, 3),
                    "first_call_s": round(first_call_s, 3),
                    "note": "upload: hash + 8 MiB blocks; first call: container start with "
                    "the volume materialised (blocks fetched, copied) and the read rounds",
                }
            )
            c = commit_bench.remote(args.files, args.file_bytes, "a")
            t0 = time.perf_counter()
            no_volume.remote()
            plain_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            n = count_files.remote()
            start_s = time.perf_counter() - t0
            emit(
                {
                    "benchmark": "volume_container_start",
                    "files": n,
                    "bytes": size + args.files * args.file_bytes,
                    "first_call_s": round(start_s, 3),
                    "without_volume_s": round(plain_s, 3),
                    "ratio_to_without": round(start_s / plain_s, 1),
                    "note": "a new container of a new version of the volume (its blocks on "
                    "the node already): the version's tree is built, an overlay mounted",
                }
            )
            # the first isolating container of the volume on this node: the node's files
            # are copied once for the containers' user (what later versions link to)
            t0 = time.perf_counter()
            iso_first.remote()
            emit(
                {
                    "benchmark": "volume_container_start_first_isolated",
                    "runtime": "bwrap",
                    "first_call_s": round(time.perf_counter() - t0, 3),
                    "note": "the first container of an isolating runtime on the node",
                }
            )
            for rt in ISOLATING:
                commit_bench.remote(10, 10, f"v-{rt}")  # a new version: its tree is new
                t0 = time.perf_counter()
                iso_plain[rt].remote()
                plain_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                n = iso_count[rt].remote(rt)
                start_s = time.perf_counter() - t0
                emit(
                    {
                        "benchmark": "volume_container_start",
                        "runtime": rt,
                        "files": n,
                        "bytes": size + args.files * args.file_bytes,
                        "first_call_s": round(start_s, 3),
                        "without_volume_s": round(plain_s, 3),
                        "ratio_to_without": round(start_s / plain_s, 1),
                        "note": "a new container of a new version of the volume (its blocks "
                        "on the node), writing a file in place and a new one",
                    }
                )
            emit(
                {
                    "benchmark": "volume_commit",
                    "files": args.files,
                    "file_bytes": args.file_bytes,
                    "commit_s": round(c["commit_s"], 3),
                    "local_write_s": round(c["local_write_s"], 3),
                    "volume_write_s": round(c["volume_write_s"], 3),
                    "ratio_to_local_write": round(c["commit_s"] / c["local_write_s"], 2),
                    "target_s": 5.0,
                    "ok": c["commit_s"] < 5.0,
                }
            )
        with tempfile.TemporaryDirectory() as d:
            local_s = _write_files(d, args.files, args.file_bytes, "client")
            t0 = time.perf_counter()
            with vol.batch_upload(force=True) as batch:
                batch.put_directory(d, "uploaded")
            upload_s = time.perf_counter() - t0
        emit(
            {
                "benchmark": "volume_batch_upload",
                "files": args.files,
                "file_bytes": args.file_bytes,
                "upload_s": round(upload_s, 3),
                "local_write_s": round(local_s, 3),
                "ratio_to_local_write": round(upload_s / local_s, 2),
            }
        )


if __name__ == "__main__":
    main()
