"""The metrics' pure parts: bounded labels, quantiles from bucket deltas."""

from __future__ import annotations

import math

from strato.server import metrics
from strato.server.dashboard.series import quantile


def test_labels_are_capped_and_unknown_functions_are_other():
    labels = metrics.FunctionLabels(cap=2)
    names = {"f1": ("a", "one"), "f2": ("a", "two"), "f3": ("b", "three"), "f1b": ("a", "one")}
    labels.resolve = names.get
    assert labels.children("f1").labels == ("a", "one")
    assert labels.children("f2").labels == ("a", "two")
    assert labels.children("f3").labels == (metrics.OTHER, metrics.OTHER)  # past the cap
    assert labels.children("f1b").labels == ("a", "one")  # a known pair (a redeploy)
    assert labels.children("nope").labels == (metrics.OTHER, metrics.OTHER)


def test_a_resolver_that_raises_never_reaches_the_hook():
    labels = metrics.FunctionLabels(cap=5)

    def boom(_fid: str):
        raise RuntimeError("bug")

    labels.resolve = boom
    assert labels.children("x").labels == (metrics.OTHER, metrics.OTHER)


def test_quantile_interpolates_within_buckets():
    bounds = [0.1, 0.5, 1.0, math.inf]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    # 10 observations, all between 0.1 and 0.5
    assert quantile(0.5, bounds, [0, 10, 10, 10]) == 0.1 + 0.4 * 0.5
    # the top bucket answers its lower bound (as histogram_quantile does)
    assert quantile(0.99, bounds, [0, 0, 0, 4]) == 1.0
