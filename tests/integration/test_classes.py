"""Classes (@app.cls with parameters, enter/exit hooks, methods), input concurrency and
dynamic batching, end to end through real containers."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from strato import exceptions as exc

# where the @exit hooks leave their marks: named at import (the app module reads it then),
# made and removed by the `running` fixture, so that collecting leaves nothing behind
MARKS = Path(tempfile.gettempdir()) / f"strato-marks-{os.getpid()}"
os.environ.setdefault("TEST_MARKS", str(MARKS))

from apps import classes  # noqa: E402


@pytest.fixture(scope="module")
def running(strato_server):
    marks = Path(os.environ["TEST_MARKS"])
    marks.mkdir(mode=0o700, exist_ok=True)
    strato_server.activate()
    try:
        with classes.app.run(quiet=True):
            yield classes.app
    finally:
        shutil.rmtree(marks, ignore_errors=True)


def test_parameters_select_separate_pools_and_enter_runs_once(running):
    small = [classes.Model().predict.remote(i) for i in range(3)]
    big = classes.Model(variant="big", scale=2).predict.remote(3)
    assert [r["value"] for r in small] == [0, 1, 2]
    assert big["value"] == 60 and big["variant"] == "big"
    assert all(r["enters"] == 1 for r in small)  # @enter ran once per container
    assert big["container"] not in {r["container"] for r in small}


def test_class_without_parameters_and_generator_method(running):
    assert list(classes.Model().countdown.remote_gen(3)) == [3, 2, 1]
    assert classes.Model.predict.remote(5)["value"] == 5


def test_unknown_parameter_and_method_are_clear_errors(running):
    with pytest.raises(exc.InvalidError, match="unknown parameters"):
        classes.Model(colour="red")
    with pytest.raises(AttributeError, match="no @strato.method"):
        classes.Model().nope  # noqa: B018


def test_enter_failure_fails_the_inputs_with_that_exception(running):
    with pytest.raises(RuntimeError, match="weights are missing"):
        classes.Broken().predict.remote(1)


def test_local_runs_enter_then_the_method():
    assert classes.Model(variant="big").predict.local(2)["value"] == 20


def test_with_options_is_its_own_pool(running):
    variant = classes.Model.with_options(cpu=0.25)
    a = variant().predict.remote(1)
    b = classes.Model().predict.remote(1)
    assert a["value"] == b["value"] == 1
    assert a["container"] != b["container"]


def _overlaps(intervals) -> int:
    """The largest number of intervals open at one instant."""
    events = sorted([(s, 1) for s, e, *_ in intervals] + [(e, -1) for s, e, *_ in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_concurrent_inputs_share_a_container(running):
    results = list(classes.overlapping.map(range(8)))
    assert _overlaps(results) > 1
    assert len({tid for _, _, tid in results}) > 1  # ran on several threads


def test_concurrent_async_inputs_overlap(running):
    assert _overlaps(list(classes.overlapping_async.map(range(8)))) > 1


def test_batched_calls_are_gathered_and_answered_one_by_one(running):
    out = list(classes.double_batch.map(range(10)))
    assert [v for v, _ in out] == [x * 2 for x in range(10)]
    assert max(n for _, n in out) > 1  # calls were gathered into lists
    with pytest.raises(ValueError, match="odd batch item 13"):
        classes.double_batch.remote(13)
    assert classes.double_batch.remote(4)[0] == 8


def test_exit_hook_runs_on_scale_down(running):
    marks = Path(os.environ["TEST_MARKS"])
    r = classes.Model(variant="small", scale=3).predict.remote(1)
    deadline = time.monotonic() + 60
    mark = marks / f"exit-{r['container']}"
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mark.exists(), "the @exit hook did not run within 60 s of the 2 s scaledown window"
    assert mark.read_text() == "small"


def test_function_with_options_is_its_own_pool(running):
    variant = classes.overlapping.with_options(cpu=0.25, timeout=30)
    start, end, _ = variant.remote(1)
    assert end > start
    with pytest.raises(exc.InvalidError, match="timeout"):
        classes.overlapping.with_options(timeout=0)
