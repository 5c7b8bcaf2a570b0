"""``@app.function(...)`` validates its arguments when it decorates, with clear errors."""

from __future__ import annotations

import pytest

import strato
from strato.exceptions import InvalidError


def square(x):
    return x * x


def _decorate(**kwargs):
    app = strato.App("validation")
    return app.function(**kwargs)(square)


def test_valid_definition():
    f = _decorate(
        cpu=(0.5, 2),
        memory=(256, 512),
        gpu=["A100-80GB", "H100"],
        timeout=60,
        retries=strato.Retries(max_retries=3, backoff_coefficient=1.5, initial_delay=0.5),
        min_containers=1,
        max_containers=3,
        scaledown_window=30,
        env={"MODE": "fast"},
    )
    spec = f._spec
    assert spec.name == "square" and spec.module == __name__
    assert spec.resources.cpu == 0.5 and spec.resources.cpu_limit == 2.0
    assert spec.resources.memory_mb == 256 and spec.resources.memory_limit_mb == 512
    assert spec.resources.gpu == ["A100-80GB", "H100"]
    assert spec.timeout == 60.0
    assert spec.retries.max_retries == 3 and spec.retries.initial_delay == 0.5
    assert spec.scaling.min_containers == 1 and spec.scaling.max_containers == 3
    assert spec.scaling.scaledown_window == 30.0
    assert spec.env == {"MODE": "fast"}


def test_int_retries_mean_fixed_delay():
    policy = _decorate(retries=2)._spec.retries
    assert policy.max_retries == 2
    assert policy.delay(1) == policy.delay(2) == 1.0


def test_retries_backoff_delays():
    policy = _decorate(
        retries=strato.Retries(
            max_retries=5, backoff_coefficient=2.0, initial_delay=1.0, max_delay=5.0
        )
    )._spec.retries
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"cpu": 0}, ["cpu=0", "positive"]),
        ({"cpu": -1}, ["cpu=-1", "positive"]),
        ({"cpu": "two"}, ["cpu='two'"]),
        ({"cpu": float("nan")}, ["cpu=nan"]),
        ({"cpu": (2, 1)}, ["cpu=(2, 1)", "below the request"]),
        ({"cpu": (1, 2, 3)}, ["(request, limit)"]),
        ({"memory": 0}, ["memory=0", "positive"]),
        ({"memory": (512, 256)}, ["memory=(512, 256)", "below the request"]),
        ({"memory": True}, ["memory=True"]),
        ({"gpu": "B9000"}, ["B9000"]),
        ({"gpu": "H100:0"}, ["H100:0"]),
        ({"gpu": 3}, ["gpu"]),
        ({"timeout": 0}, ["timeout=0", "seconds"]),
        ({"timeout": 10**9}, ["timeout=1000000000"]),
        ({"timeout": "1m"}, ["timeout='1m'"]),
        ({"retries": -1}, ["retries=-1"]),
        ({"retries": 11}, ["retries=11"]),
        ({"retries": "3"}, ["retries='3'"]),
        ({"retries": True}, ["retries=True"]),
        ({"scaledown_window": 1}, ["scaledown_window=1"]),
        ({"scaledown_window": 10**6}, ["scaledown_window=1000000"]),
        ({"min_containers": 3, "max_containers": 2}, ["min_containers=3", "max_containers=2"]),
        ({"min_containers": -1}, ["min_containers=-1"]),
        ({"max_containers": 0}, ["max_containers=0"]),
        ({"buffer_containers": 1.5}, ["buffer_containers=1.5"]),
        ({"env": {"A": 1}}, ["env="]),
        ({"env": {"STRATO_X": "1"}}, ["STRATO_X", "reserved"]),
        ({"serialized": "yes"}, ["serialized="]),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, words):
    with pytest.raises(InvalidError) as info:
        _decorate(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_retries": -1}, ["max_retries=-1"]),
        ({"max_retries": 11}, ["max_retries=11"]),
        ({"max_retries": 1, "backoff_coefficient": 0.5}, ["backoff_coefficient=0.5"]),
        ({"max_retries": 1, "initial_delay": -1}, ["initial_delay=-1"]),
        ({"max_retries": 1, "max_delay": 0}, ["max_delay=0"]),
    ],
)
def test_bad_retries_policy(kwargs, words):
    with pytest.raises(InvalidError) as info:
        strato.Retries(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_missing_parentheses():
    app = strato.App("validation")
    with pytest.raises(InvalidError, match=r"parentheses.*@app\.function\(\)"):

        @app.function
        def f():
            pass


def test_nested_function_needs_serialized():
    app = strato.App("validation")

    with pytest.raises(InvalidError) as info:

        @app.function()
        def inner(x):
            return x

    assert "inner" in str(info.value) and "serialized=True" in str(info.value)

    @app.function(serialized=True)
    def inner2(x):
        return x

    assert inner2._spec.serialized is not None


def test_two_functions_with_one_name():
    app = strato.App("validation")
    app.function()(square)
    with pytest.raises(InvalidError, match="two functions named 'square'"):
        app.function()(square)


def test_decorating_twice():
    app = strato.App("validation")
    f = app.function()(square)
    with pytest.raises(InvalidError, match="decorated twice"):
        strato.App("other").function()(f)


def test_decorating_something_not_callable():
    with pytest.raises(InvalidError, match="decorates functions"):
        strato.App("validation").function()(42)


@pytest.mark.parametrize("name", ["", 5, "x" * 65])
def test_bad_app_name(name):
    with pytest.raises(InvalidError, match="App name"):
        strato.App(name)


def test_calling_before_the_app_runs_says_what_to_do(monkeypatch):
    # no control plane is contacted: the function has no id until its app runs
    monkeypatch.setattr("strato.client.session.api", lambda *a, **k: object())
    f = _decorate()
    with pytest.raises(strato.exceptions.ExecutionError, match=r"app\.run"):
        f.remote(3)


def test_local_and_direct_call():
    f = _decorate()
    assert f.local(4) == 16
    with pytest.raises(InvalidError, match=r"\.remote\(\.\.\.\)"):
        f(4)
