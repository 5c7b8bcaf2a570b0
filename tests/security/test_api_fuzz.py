"""API fuzzing: schemathesis generates requests from the control plane's own
``/openapi.json`` (every route, its path and query parameters and its body, as JSON and
as msgpack: the API accepts both) and sends them, with the API token, to a real control
plane. No request may get a response >= 500.

The control plane runs without a worker agent (``STRATO_LOCAL_WORKER=0``): the fuzz
creates apps with arbitrary specs, and none of them should start containers on this
machine. Each operation is fuzzed with schema-valid (positive) and invalid (negative) data. Half
of the generated requests have their path parameters replaced by real ids
(an app, a function, a call, a blob) so that the handlers behind the 404s are fuzzed too.
Long-poll waits (``timeout=``, ``wait``) over 50 ms are cut to 10 ms, so that 10,000
cases take about a minute; values that must be refused (NaN, infinities, negatives,
strings) are sent as generated.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections import Counter

import msgspec
import pytest
import requests
import schemathesis
from fuzzing import agentless_control_plane, msgpack_body
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core import NOT_SET

from strato.protocol import messages as m

pytestmark = pytest.mark.slow

MIN_CASES = 10_000  # spread over every operation and both modes (>= 40 each)
LONG_POLL_CAP_S = 0.05


schemathesis.serializer("application/msgpack")(msgpack_body)


@pytest.fixture(scope="module")
def control_plane():
    with agentless_control_plane("strato-fuzz-") as handle:
        yield handle


def _seed(http: requests.Session, url: str) -> dict[str, list[str]]:
    """Real ids for path parameters: an app with a function, a call, a blob."""
    spec = m.FunctionSpec(name="f", module="m", qualname="f")
    resp = http.post(
        f"{url}/apps",
        data=msgspec.msgpack.encode(m.CreateApp("fuzzed", [spec], detached=True)),
    )
    resp.raise_for_status()
    info = msgspec.msgpack.decode(resp.content, type=m.AppInfo)
    fid = info.functions[0].function_id
    call_id = "fc-" + secrets.token_hex(8)
    call = m.CreateCall(call_id, fid, [m.InputItem(0, b"\x80\x04N.")], closed=False)
    http.post(f"{url}/calls", data=msgspec.msgpack.encode(call)).raise_for_status()
    blob = b"fuzz" * 10
    key = hashlib.sha256(blob).hexdigest()
    http.put(f"{url}/blobs/{key}", data=blob).raise_for_status()
    return {
        "ref": [info.app_id, "fuzzed"],
        "app_id": [info.app_id],
        "name": ["f"],
        "function_id": [fid],
        "call_id": [call_id],
        "key": [key],
    }


def _cap_long_polls(case) -> None:
    def cap(v):
        if isinstance(v, int | float) and not isinstance(v, bool) and v > LONG_POLL_CAP_S:
            return 0.01
        if isinstance(v, str):
            try:
                if float(v) > LONG_POLL_CAP_S:
                    return "0.01"
            except ValueError:
                pass
        return v

    if isinstance(case.query, dict) and "timeout" in case.query:
        case.query["timeout"] = cap(case.query["timeout"])
    if isinstance(case.body, dict) and "wait" in case.body:
        case.body["wait"] = cap(case.body["wait"])


# 10,000 cases take about 5 minutes on a busy 2-core machine: past pytest's default 300 s
@pytest.mark.timeout(900)
def test_fuzz_the_api_no_server_errors(control_plane):
    url = control_plane.url
    token = (control_plane.home / "token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    http = requests.Session()
    http.headers.update(auth)
    real = _seed(http, url)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 18, f"the OpenAPI description lists {len(operations)} operations"
    assert any(
        "application/json" in op.definition.raw.get("requestBody", {}).get("content", {})
        for op in operations
    ), "no operation takes a JSON body: the fuzz would only ever get 415s"

    # one budget for the whole API: it grows by routes, the run time must not
    examples = max(40, -(-MIN_CASES * 13 // (10 * 2 * len(operations))))  # some run short
    statuses: Counter[int] = Counter()
    per_operation: Counter[str] = Counter()
    media: Counter[str] = Counter()
    errors: list[str] = []
    rng = random.Random(14)
    started = time.monotonic()

    def fuzz(op, mode: GenerationMode) -> None:
        label = f"{op.method.upper()} {op.path} ({mode.value})"

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            if case.path_parameters and rng.random() < 0.5:
                for name in case.path_parameters:
                    if name in real:
                        case.path_parameters[name] = rng.choice(real[name])
            _cap_long_polls(case)
            case.headers = {**(case.headers or {}), **auth}  # not the generated credentials
            try:
                resp = case.call(base_url=url, session=http, headers=auth, timeout=30)
            except requests.RequestException as e:  # the server hung up: as bad as a 500
                errors.append(f"{label}: {type(e).__name__}: {e}\n  {case.as_curl_command()}")
                return
            statuses[resp.status_code] += 1
            per_operation[label] += 1
            if case.body is not NOT_SET and case.media_type:
                media[case.media_type] += 1
            if resp.status_code >= 500:
                errors.append(
                    f"{label}: HTTP {resp.status_code} {resp.content[:300]!r}\n"
                    f"  {case.as_curl_command()}"
                )

        try:
            run()
        except Unsatisfiable:  # nothing to negate (no parameters, no body): positive only
            unnegatable.append(label)

    unnegatable: list[str] = []
    for op in operations:
        # positive: bodies and parameters the schema allows (the handlers' logic);
        # negative: ones it does not (wrong types, missing fields, out-of-range numbers)
        fuzz(op, GenerationMode.POSITIVE)
        fuzz(op, GenerationMode.NEGATIVE)

    elapsed = time.monotonic() - started
    total = sum(statuses.values()) + len(errors)
    summary = (
        f"{total} cases over {len(operations)} operations in {elapsed:.0f}s; "
        f"statuses {dict(sorted(statuses.items()))}; positive only: {len(unnegatable)}; "
        f"bodies {dict(media)}"
    )
    print(summary)
    assert not errors, f"{len(errors)} server errors ({summary}):\n" + "\n".join(errors[:20])
    assert total >= MIN_CASES, f"only {total} generated cases ({summary})"
    # the fuzz reached the handlers: not everything was refused at the door
    assert statuses[200] > 500, f"few requests got through ({summary})"
    assert statuses[401] == 0, f"auth was not sent ({summary})"
    assert media["application/json"] > 1000 and media["application/msgpack"] > 1000, summary
