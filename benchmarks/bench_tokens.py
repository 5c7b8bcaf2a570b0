"""What a workspace token costs per request, against the installation's token.

One fresh embedded control plane with one warm function. The same request (``GET
/functions/{id}/stats``: authenticated, scoped to the caller's workspace, answered from
memory) is sent with the installation's token and with a developer token of workspace
``main`` (``st_<id>_<secret>``: a cached row, a sha256 and a constant-time comparison per
request; over the local channel a revocation check per request), over HTTP and over the
local channel socket, in alternating rounds. Reports p50 per request and the ratio
workspace token / installation token of all rounds' p50s, and the median of each
round's ratio (the machine is shared: rerun close calls). Target: within 1.10.

    .venv/bin/python benchmarks/bench_tokens.py [--requests 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import emit, latency_summary, note, strato_env

import strato

app = strato.App("bench-tokens")


@app.function()
def noop(x):
    return x


def timed(call, n: int) -> list[float]:
    out = []
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        call()
        out.append(perf() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from strato.client.http import ApiClient
    from strato.client.local_channel import LocalChannelClient
    from strato.protocol import messages as m

    with strato_env() as home:
        with app.run(quiet=True):
            assert noop.remote(1) == 1
            url = json.loads((home / "server.json").read_text())["url"]
            sock = json.loads((home / "server.json").read_text())["channel"]
            install = (home / "token").read_text().strip()
            admin = ApiClient(url, install)
            token = admin.call("POST", "/tokens", m.CreateToken("developer"), m.NewToken).token
            path = f"/functions/{noop.object_id}/stats"
            clients = {
                ("http", "installation"): ApiClient(url, install),
                ("http", "workspace"): ApiClient(url, token),
                ("channel", "installation"): LocalChannelClient(url, install, sock),
                ("channel", "workspace"): LocalChannelClient(url, token, sock),
            }
            samples: dict = {k: [] for k in clients}
            ratios: dict = {"http": [], "channel": []}
            for c in clients.values():  # warm: connections, caches
                for _ in range(200):
                    c.call("GET", path, None, m.FunctionStats)
            for _ in range(args.rounds):
                p50 = {}
                for key, c in clients.items():
                    got = timed(
                        lambda c=c: c.call("GET", path, None, m.FunctionStats),
                        args.requests // args.rounds,
                    )
                    samples[key] += got
                    p50[key] = latency_summary(got)["p50_ms"]
                for t in ratios:
                    ratios[t].append(p50[(t, "workspace")] / p50[(t, "installation")])
    for transport in ("http", "channel"):
        base = latency_summary(samples[(transport, "installation")])
        ws = latency_summary(samples[(transport, "workspace")])
        ratio = round(ws["p50_ms"] / base["p50_ms"], 3)
        per_round = round(sorted(ratios[transport])[len(ratios[transport]) // 2], 3)
        emit(
            {
                "bench": "tokens",
                "transport": transport,
                "installation_p50_ms": base["p50_ms"],
                "workspace_p50_ms": ws["p50_ms"],
                "ratio": ratio,
                "round_median_ratio": per_round,
                "target": 1.10,
            }
        )
        if ratio > 1.10:
            note(f"{transport}: the workspace token's requests took {ratio}x the baseline's")


if __name__ == "__main__":
    main()
