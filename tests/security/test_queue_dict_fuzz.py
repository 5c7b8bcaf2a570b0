"""API fuzzing of the Dict and Queue routes: schemathesis generates requests from the
control plane's ``/openapi.json`` for every ``/dicts`` and ``/queues`` operation
(positive and negative, JSON and msgpack bodies), half of them aimed at a real Dict or
Queue, and sends them with the API token. No request may get a response >= 500, and the
control plane still works afterwards. Long-poll waits are cut to 10 ms."""

from __future__ import annotations

import random

import msgspec
import pytest
import requests
import schemathesis
from fuzzing import agentless_control_plane, msgpack_body
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from strato.protocol import messages as m

pytestmark = pytest.mark.slow
EXAMPLES = 60  # per operation and mode: x 24 operations x 2 ~ 3,000 cases


@pytest.fixture(scope="module")
def control_plane():
    with agentless_control_plane("strato-fuzz-state-") as handle:
        yield handle


def _cap(case) -> None:
    def cap(v):
        try:
            return "0.01" if isinstance(v, str) and float(v) > 0.05 else v
        except ValueError:
            return v

    if isinstance(case.query, dict) and "timeout" in case.query:
        case.query["timeout"] = cap(case.query["timeout"])
    if isinstance(case.body, dict) and isinstance(case.body.get("timeout"), int | float):
        case.body["timeout"] = min(case.body["timeout"], 0.01)


def test_fuzz_the_state_routes(control_plane):
    schemathesis.serializer("application/msgpack")(msgpack_body)
    url = control_plane.url
    token = (control_plane.home / "token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    http = requests.Session()
    http.headers.update(auth)

    def make(base: str, name: str) -> str:
        body = msgspec.msgpack.encode(m.StateLookup(name, True))
        resp = http.post(f"{url}{base}/lookup", data=body)
        resp.raise_for_status()
        return msgspec.msgpack.decode(resp.content, type=m.StateRef).object_id

    real = {"/dicts": [make("/dicts", "fuzzed")], "/queues": [make("/queues", "fuzzed")]}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [
        r.ok() for r in schema.get_all_operations() if r.ok().path.startswith(("/dicts", "/queues"))
    ]
    assert len(operations) >= 20, [op.path for op in operations]
    rng = random.Random(10)
    errors: list[str] = []
    cases = 0

    def fuzz(op, mode: GenerationMode) -> None:
        label = f"{op.method.upper()} {op.path} ({mode.value})"
        ids = real["/dicts" if op.path.startswith("/dicts") else "/queues"]

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            nonlocal cases
            if case.path_parameters and "object_id" in case.path_parameters:
                if rng.random() < 0.5:
                    case.path_parameters["object_id"] = ids[0]
            _cap(case)
            try:
                resp = case.call(base_url=url, session=http, headers=auth, timeout=30)
            except requests.RequestException as e:
                errors.append(f"{label}: {type(e).__name__}: {e}\n  {case.as_curl_command()}")
                return
            cases += 1
            if resp.status_code >= 500:
                errors.append(
                    f"{label}: HTTP {resp.status_code} {resp.content[:300]!r}\n"
                    f"  {case.as_curl_command()}"
                )

        try:
            run()
        except Unsatisfiable:
            pass

    for op in operations:
        fuzz(op, GenerationMode.POSITIVE)
        fuzz(op, GenerationMode.NEGATIVE)
    assert not errors, "\n".join(errors[:20])
    assert cases >= 1000
    # still works
    resp = http.get(f"{url}/dicts")
    assert resp.status_code == 200
