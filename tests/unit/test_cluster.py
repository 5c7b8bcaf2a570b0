"""Pure parts of the many-machines code: join tokens, the relay's stream, exposure checks,
the worker command's parsing."""

from __future__ import annotations

import asyncio
import json

import pytest

from strato import exceptions as exc
from strato.cli.worker import agent_address, parse_labels
from strato.protocol import frames
from strato.protocol import messages as m
from strato.server.cluster.agents import check_exposure
from strato.server.cluster.join_tokens import JoinTokens
from strato.server.cluster.relay import RelayHub, RelayStream


def test_join_tokens_are_kept_hashed_and_revocable(tmp_path):
    tokens = JoinTokens(tmp_path)
    rec, token = tokens.create("rack-1")
    assert tokens.verify(token) == rec.id
    stored = (tmp_path / "join-tokens.json").read_text()
    assert (
        token.split("_", 2)[2] not in stored and json.loads(stored)["tokens"][0]["name"] == "rack-1"
    )
    assert (tmp_path / "join-tokens.json").stat().st_mode & 0o777 == 0o600
    for bad in ("", "stj_", token + "x", token[:-1], "stj_" + rec.id, "x" * 500):
        assert tokens.verify(bad) is None
    other_rec, other = tokens.create()
    tokens.revoke(rec.id)
    assert tokens.verify(token) is None and tokens.verify(other) == other_rec.id
    with pytest.raises(exc.NotFoundError):
        tokens.revoke(rec.id)


def test_exposure_beyond_loopback_needs_a_real_token():
    assert check_exposure("127.0.0.1", "") == []
    with pytest.raises(exc.InvalidError, match="beyond loopback"):
        check_exposure("0.0.0.0", "short")
    warnings = check_exposure("0.0.0.0", "x" * 43)
    assert any("plain HTTP" in w for w in warnings)


def test_worker_arguments():
    assert parse_labels("zone=a, tier=spot") == {"zone": "a", "tier": "spot"}
    with pytest.raises(exc.InvalidError, match="key=value"):
        parse_labels("zone")
    assert agent_address("http://10.0.0.1:7749", None) == (
        "http://10.0.0.1:7749",
        "tcp:10.0.0.1:7751",
    )
    assert agent_address("10.0.0.1:80", 9000) == ("http://10.0.0.1:80", "tcp:10.0.0.1:9000")
    with pytest.raises(exc.InvalidError):
        agent_address("ftp://x", None)


def test_relay_streams_carry_frames_both_ways_and_end_with_the_agent():
    async def main():
        sent: list[object] = []
        got: list[object] = []

        async def handler(reader, writer):
            while (msg := await frames.read_frame(reader, 1 << 20)) is not None:
                got.append(msg)
                writer.write(frames.encode(m.StopContainer(1.0)))

        hub = RelayHub("node-x", sent.append, handler)
        await hub.on_frame(m.RelayOpen(1))
        data = frames.encode(m.ContainerHello("ct-1", "t")) + frames.encode(m.ContainerReady())
        for i in range(0, len(data), 3):  # in pieces that cut frames anywhere
            await hub.on_frame(m.RelayData(1, data[i : i + 3]))
        await asyncio.sleep(0.01)
        assert [type(x) for x in got] == [m.ContainerHello, m.ContainerReady]
        replies = [x for x in sent if isinstance(x, m.RelayData)]
        assert len(replies) == 2 and all(r.conn == 1 for r in replies)
        with pytest.raises(frames.FrameError):
            await hub.on_frame(m.RelayOpen(1))  # a stream opened twice
        await hub.on_frame(m.RelayData(7, b"x"))  # an unknown stream: dropped
        await hub.close()
        assert hub.streams == {}

    asyncio.run(main())


def test_a_relayed_frame_over_the_limit_ends_only_its_stream():
    async def main():
        ended: list[str] = []

        async def handler(reader, writer):
            try:
                await frames.read_frame(reader, 1 << 10)
            except frames.FrameTooLarge:
                ended.append("too large")

        sent: list[object] = []
        hub = RelayHub("node-x", sent.append, handler)
        await hub.on_frame(m.RelayOpen(1))
        await hub.on_frame(m.RelayData(1, (1 << 20).to_bytes(4, "big")))
        await asyncio.sleep(0.01)
        assert ended == ["too large"]
        assert any(isinstance(x, m.RelayClose) and x.conn == 1 for x in sent)
        assert 1 not in hub.streams

    asyncio.run(main())


def test_relay_stream_reports_a_cut_frame():
    async def main():
        s = RelayStream()
        s.feed(b"\x00\x00\x00\x09abc")
        s.feed_eof()
        with pytest.raises(frames.FrameError):
            await frames.read_frame(s)

    asyncio.run(main())


def test_relay_data_is_bounded_on_the_wire():
    with pytest.raises(frames.FrameError):
        frames.decode(frames.encode(m.RelayData(1, b"x" * (m.RELAY_CHUNK + 1)))[4:])


def test_the_indexed_placer_decides_as_the_scheduler_does():
    import random

    from strato.server.cluster.placer import Placer
    from strato.server.scheduler.placement import place, release, reserve

    sys_path = __import__("pathlib").Path(__file__).parents[2] / "benchmarks"
    __import__("sys").path.insert(0, str(sys_path))
    import bench_placement as bp

    rng = random.Random(5)
    nodes = bp.cluster(120, rng)
    pending = bp.containers(3000, rng)
    ref = [n.copy() for n in nodes]
    by_id = {n.node_id: n for n in ref}
    placer = Placer([n.copy() for n in nodes])
    held = []
    for i, req in enumerate(pending):
        a, b = place(req, ref), placer.place(req)
        assert a == b, (i, a, b)
        if a is not None:
            reserve(by_id[a.node_id], req, a)
            placer.reserve(req, b)
            held.append((req, a))
        if i % 7 == 0 and held:  # containers end too
            r, p = held.pop(rng.randrange(len(held)))
            release(by_id[p.node_id], r, p)
            placer.release(r, p)
        if i == 1500:  # a node goes unhealthy, another leaves
            sick = nodes[3].node_id
            by_id[sick].healthy = False
            placer.nodes[sick].healthy = False
            placer.update(sick)
            gone = nodes[4].node_id
            ref.remove(by_id.pop(gone))
            placer.remove(gone)
            held = [(r, p) for r, p in held if p.node_id != gone]


def test_the_fleet_index_tracks_the_fleets_own_views():
    import random

    from strato.server.cluster.placer import FleetIndex
    from strato.server.scheduler.placement import place, release, reserve

    sys_path = __import__("pathlib").Path(__file__).parents[2] / "benchmarks"
    __import__("sys").path.insert(0, str(sys_path))
    import bench_placement as bp

    rng = random.Random(9)
    views = bp.cluster(60, rng)
    index = FleetIndex()
    held = []
    for i, req in enumerate(bp.containers(1500, rng)):
        eligible = [v for v in views if v.healthy and v.node_id != "node-00007"]
        expected = place(req, eligible)
        got = index.place(req, eligible)
        assert got == expected, i
        if got is not None:
            reserve(next(v for v in views if v.node_id == got.node_id), req, got)
            index.touched(got.node_id)
            held.append((req, got))
        if i % 5 == 0 and held:
            r, p = held.pop(rng.randrange(len(held)))
            release(next(v for v in views if v.node_id == p.node_id), r, p)
            index.touched(p.node_id)
        if i == 700:
            views[3].healthy = False  # lost: no longer eligible, the index is rebuilt
    assert index.rebuilds == 2
    small = FleetIndex(threshold=1000)
    assert small.place(bp.containers(1, rng)[0], views) is not None and small.placer is None
