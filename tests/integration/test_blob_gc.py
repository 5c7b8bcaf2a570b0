"""The blob collector on a real control plane (``server/blob_gc.py``; grace period 0, no
background loop): after an app stopped, its call expired, a Dict entry was popped or
overwritten and a volume file removed, ``strato server gc-blobs --dry-run`` deletes
nothing, and ``POST /blobs/gc`` deletes exactly the blobs those rows named, and keeps
every blob a live row names: the running app's code and outputs, the Dict's values and
the volume's blocks still read afterwards (a container mounts the volume and reads it).
A Queue item over the blob threshold is kept inline: it makes no blob."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from click.testing import CliRunner
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.cli.main import main as cli
from strato.client import session
from strato.protocol import messages as m

RETENTION_S = 5.0
ENV = {
    "STRATO_BLOB_GC_GRACE_S": "0",
    "STRATO_BLOB_GC_INTERVAL_S": "0",
    "STRATO_BLOB_THRESHOLD": "2048",
    "STRATO_OUTPUT_RETENTION": str(RETENTION_S),
}

DEAD_APP = """
import sys
import strato

app = strato.App("strato-test-gc-dead")


@app.function(runtime="process")
def echo(data: bytes) -> bytes:
    return data[::-1]


if __name__ == "__main__":
    with app.run(quiet=True):
        call = echo.spawn(b"dead argument %s " * 4000)
        assert len(call.get(timeout=120)) == len(b"dead argument %s " * 4000)
        print(call.object_id)
"""

LIVE_APP = """
import hashlib
import os

import strato

app = strato.App("strato-test-gc-live")
vol = strato.Volume.from_name({vol!r}, create_if_missing=True)


@app.function(runtime="process")
def make(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


@app.function(runtime="process", volumes={{"/srv": vol}})
def read(path: str) -> str:
    with open(os.path.join("/srv", path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
"""


def stored(home: Path) -> dict[str, int]:
    """The blob store's blobs: key -> size."""
    out = {}
    for shard in (home / "blobs").iterdir():
        if len(shard.name) == 2 and shard.is_dir():
            for f in shard.iterdir():
                if len(f.name) == 64:
                    out[f.name] = f.stat().st_size
    return out


def new_blobs(home: Path, before: dict[str, int], step) -> set[str]:
    step()
    return set(stored(home)) - set(before)


def test_gc_deletes_exactly_the_unreferenced_blobs(strato_server, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    vol_name, dict_name, queue_name = f"gc-vol-{tag}", f"gc-dict-{tag}", f"gc-queue-{tag}"
    with dedicated_server(ENV) as server:
        home = server.home
        # --- an app that runs and stops, with a call (large argument and output) that expires
        dead_dir = tmp_path / "dead"
        dead_dir.mkdir()
        (dead_dir / f"gc_dead_{tag}.py").write_text(DEAD_APP.replace("%s", tag))
        before = stored(home)
        out = subprocess.run(
            [sys.executable, str(dead_dir / f"gc_dead_{tag}.py")],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr
        dead_call = out.stdout.split()[-1]
        dead_run = set(stored(home)) - set(before)
        script = hashlib.sha256((dead_dir / f"gc_dead_{tag}.py").read_bytes()).hexdigest()
        assert script in dead_run and len(dead_run) == 3, "its code, argument and output"

        # --- a Queue item over the blob threshold: inline, no blob
        q = strato.Queue.from_name(queue_name, create_if_missing=True)
        have = stored(home)
        assert not new_blobs(home, have, lambda: q.put(os.urandom(200_000)))

        # --- Dict values: one kept, one popped, one overwritten
        d = strato.Dict.from_name(dict_name, create_if_missing=True)
        values = {k: os.urandom(50_000) for k in ("keep", "gone", "over1", "over2")}
        (keep_v,) = new_blobs(home, stored(home), lambda: d.put("keep", values["keep"]))
        (gone_v,) = new_blobs(home, stored(home), lambda: d.put("gone", values["gone"]))
        (over1_v,) = new_blobs(home, stored(home), lambda: d.put("over", values["over1"]))
        d.pop("gone")
        (over2_v,) = new_blobs(home, stored(home), lambda: d.put("over", values["over2"]))

        # --- volume files: one kept, one removed
        vol = strato.Volume.from_name(vol_name, create_if_missing=True)
        files = {"keep.bin": os.urandom(64_000), "gone.bin": os.urandom(64_000)}

        def upload(name: str):
            def run():
                with vol.batch_upload() as b:
                    b.put_file(_bytes_file(tmp_path, name, files[name]), name)

            return run

        (keep_block,) = new_blobs(home, stored(home), upload("keep.bin"))
        (gone_block,) = new_blobs(home, stored(home), upload("gone.bin"))
        vol.remove_file("gone.bin")

        # --- the dead call expires (expiry runs a second after the control plane starts)
        time.sleep(RETENTION_S + 0.5)
        for k, v in ENV.items():
            monkeypatch.setenv(k, v)  # the restarted control plane's settings
        server.restart()

        def expired():
            try:
                strato.FunctionCall.from_id(dead_call).get(timeout=1)
            except exc.NotFoundError:
                return True
            return False

        wait_until(expired, 30, "the dead app's call to expire", every=0.5)

        # --- a running app with a large output (its call's rows live; expiry runs next
        # 60 s after the restart: the checks below come well before it)
        live_dir = tmp_path / "live"
        live_dir.mkdir()
        (live_dir / f"gc_live_{tag}.py").write_text(LIVE_APP.format(vol=vol_name))
        monkeypatch.syspath_prepend(str(live_dir))
        live = importlib.import_module(f"gc_live_{tag}")
        with live.app.run(quiet=True):
            call = live.make.spawn(100_000)
            made = call.get(timeout=120)
            dead = dead_run | {gone_v, over1_v, gone_block}
            kept = {keep_v, over2_v, keep_block}
            have = stored(home)
            assert dead | kept <= set(have)

            dry = CliRunner().invoke(cli, ["server", "gc-blobs", "--dry-run"])
            assert dry.exit_code == 0, dry.output
            assert f"would delete {len(dead)} blobs" in dry.output, dry.output
            assert stored(home) == have, "a dry run deletes nothing"

            res = session.api().call("POST", "/blobs/gc", m.BlobGc(), m.BlobGcReport)
            after = stored(home)
            assert set(have) - set(after) == dead, (
                "exactly the unreferenced blobs go (a live call's rows could only have "
                "expired here if this took over a minute since the restart)"
            )
            assert (res.deleted, res.bytes_freed) == (len(dead), sum(have[k] for k in dead))
            assert res.kept == len(after) and res.kept_young == 0

            # --- everything live still works
            assert call.get(timeout=60) == made, "the live call's output still reads"
            assert live.make.remote(100_000) == made, "the app still runs"
            assert live.read.remote("keep.bin") == hashlib.sha256(files["keep.bin"]).hexdigest()
        assert d.get("keep") == values["keep"] and d.get("over") == values["over2"]
        assert "gone" not in d
        assert b"".join(vol.read_file("keep.bin")) == files["keep.bin"]
        assert q.get(timeout=5) is not None
    strato_server.activate()


def _bytes_file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / f"upload-{name}"
    path.write_bytes(data)
    return str(path)
