"""Modal's region=, cloud= and nonpreemptible= on @app.function / @app.cls."""

from __future__ import annotations

import pytest

import strato
from strato.exceptions import InvalidError
from strato.sdk import options

app = strato.App("opts")


@app.function(gpu="H100", region=["us-east", "eu"], cloud="AWS", nonpreemptible=True)
def f() -> None: ...


def test_placement_options_reach_the_spec():
    spec = f._spec
    assert spec.region == ["us-east", "eu"] and spec.cloud == "aws" and spec.nonpreemptible
    assert options.placement("us", None, False) == {
        "region": "us",
        "cloud": None,
        "nonpreemptible": False,
    }


@pytest.mark.parametrize(
    "region, cloud, nonpreemptible, says",
    [
        ([], None, False, "region"),
        (5, None, False, "region"),
        ("", None, False, "region"),
        (None, "", False, "cloud"),
        (None, 3, False, "cloud"),
        (None, None, "yes", "nonpreemptible"),
    ],
)
def test_bad_placement_options(region, cloud, nonpreemptible, says):
    with pytest.raises(InvalidError, match=says):
        options.placement(region, cloud, nonpreemptible)
