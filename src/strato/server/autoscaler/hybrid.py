"""The hybrid histogram keep-alive policy of "Serverless in the Wild" (Shahrad et al., ATC 2020).

For each function it learns the distribution of *idle times*: the time from the moment the
function last had nothing to do (no input running or queued) to the next input's arrival.
Inputs that arrive while the function is busy are not idle times and are not recorded.
From that distribution it derives two windows, both measured from the start of an idle
period:

- the **pre-warm window**: how long to wait with no warm container before starting one,
  expecting the next input;
- the **keep-alive window**: how long to keep that container warm once it is there (from
  the end of the pre-warm window, or from the start of the idle period when the pre-warm
  window is zero).

So a container is warm during ``[idle_start + prewarm, idle_start + prewarm + keepalive)``.

The state is an immutable :class:`HistogramState`; :func:`observe_idle` returns a new one.
Everything here is a pure function: no I/O, no clock reads.

The policy, as in the paper:

1. A **range-limited histogram**: one-minute bins over four hours (240 bins). Idle times of
   four hours or more are not binned but counted as *out of bounds* (OOB).
2. **Pattern check**: if too few idle times were seen (``min_samples``), the pattern is not
   known yet; if the share of OOB idle times is ``oob_threshold`` or more, the histogram
   cannot describe the function; if the coefficient of variation (CV) of the bin counts is
   below ``cv_threshold``, the idle times are spread too evenly over the range to predict
   anything (a flat histogram).
3. **Representative histogram**: the head percentile (5th) gives the pre-warm window, minus a
   margin (10 %); the tail percentile (99th) gives the end of the keep-alive window, plus the
   margin: ``prewarm = head_bin * 60 s * (1 - margin)``,
   ``keepalive = (tail_bin + 1) * 60 s * (1 + margin) - prewarm``.
4. **Not representative** (too few samples or a flat histogram): a standard keep-alive with
   no pre-warming, ``(0, fallback_keepalive_s)``; the paper uses the histogram range (4 h).
5. **Mostly OOB**: the paper forecasts the next idle time with ARIMA. We use a simpler
   predictor instead of ARIMA: the median of the last ``RECENT_LEN`` (5) idle times (robust
   to one-off outliers, exact for a strictly periodic function; it has no trend term).
   The container is then warm from ``(1 - predict_margin)`` to ``(1 + predict_margin)`` of
   the prediction: ``prewarm = 0.85 * p``, ``keepalive = 0.30 * p`` with the paper's 15 %.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Literal, NamedTuple

BIN_S = 60.0  # one-minute bins
RANGE_BINS = 240  # four hours
RECENT_LEN = 5  # idle times kept for the out-of-bounds predictor

Pattern = Literal["warmup", "oob", "flat", "histogram"]


@dataclass(frozen=True, slots=True)
class HybridParams:
    """Tunables of the hybrid histogram policy; the defaults are the paper's."""

    head_pct: float = 5.0
    tail_pct: float = 99.0
    margin: float = 0.10  # histogram windows: prewarm shrunk, keep-alive end stretched by 10 %
    cv_threshold: float = 2.0  # a histogram with a lower CV is "flat": not representative
    # The paper gives no numbers for these two; ours:
    min_samples: int = 5  # fewer idle times seen: the pattern is not known yet
    oob_threshold: float = 0.5  # this share of idle times >= the range: use the predictor
    predict_margin: float = 0.15
    fallback_keepalive_s: float = RANGE_BINS * BIN_S  # standard keep-alive (paper: the range)
    # A floor on the keep-alive window, whatever the branch (0 = none).
    min_keepalive_s: float = 0.0


PAPER = HybridParams()


class Windows(NamedTuple):
    """Both windows in seconds, measured as described in the module docstring."""

    prewarm_s: float
    keepalive_s: float


@dataclass(frozen=True, slots=True)
class HistogramState:
    """One function's idle-time record. Immutable: :func:`observe_idle` returns a new one.

    ``bins[i]`` counts idle times in ``[i, i + 1)`` minutes; ``oob`` those of
    ``len(bins)`` minutes or more; ``count`` is ``sum(bins)`` and ``sum_sq`` the sum of the
    squared bin counts (kept so that the CV costs O(1)); ``recent`` holds the last few
    idle times in minutes, oldest first, for the out-of-bounds predictor.
    """

    bins: tuple[int, ...] = (0,) * RANGE_BINS
    oob: int = 0
    count: int = 0
    sum_sq: int = 0
    recent: tuple[float, ...] = ()

    @property
    def total(self) -> int:
        """Idle times observed, in bounds or not."""
        return self.count + self.oob


def empty_histogram(range_bins: int = RANGE_BINS) -> HistogramState:
    """A histogram with ``range_bins`` one-minute bins and nothing observed."""
    if range_bins < 2:
        raise ValueError(f"range_bins={range_bins}: a histogram needs at least 2 bins")
    return HistogramState(bins=(0,) * range_bins)


def observe_idle(state: HistogramState, idle_minutes: float) -> HistogramState:
    """Record one idle time (minutes); returns the new state, ``state`` is left as it was."""
    if math.isnan(idle_minutes):
        raise ValueError("idle time is NaN")
    idle_minutes = max(0.0, idle_minutes)
    recent = (*state.recent, idle_minutes)[-RECENT_LEN:]
    n = len(state.bins)
    if idle_minutes >= n:  # also +inf
        return HistogramState(state.bins, state.oob + 1, state.count, state.sum_sq, recent)
    i = int(idle_minutes * 60.0 // BIN_S)
    old = state.bins[i]
    bins = (*state.bins[:i], old + 1, *state.bins[i + 1 :])
    return HistogramState(bins, state.oob, state.count + 1, state.sum_sq + 2 * old + 1, recent)


def coefficient_of_variation(state: HistogramState) -> float:
    """CV (sample standard deviation / mean) of the bin counts; 0 for an empty histogram."""
    if state.count == 0:
        return 0.0
    n = len(state.bins)
    mean = state.count / n
    var = max(0.0, (state.sum_sq - n * mean * mean) / (n - 1))
    return math.sqrt(var) / mean


def percentile_bin(state: HistogramState, pct: float) -> int:
    """The first bin at which the cumulative in-bounds count reaches ``pct`` percent."""
    if state.count == 0:
        raise ValueError("percentile of an empty histogram")
    target = state.count * min(100.0, max(0.0, pct)) / 100.0
    cumulative = list(accumulate(state.bins))
    # bisect_left finds the first cumulative >= target; a target of 0 means the first
    # non-empty bin, so search for at least a fraction of one sample.
    return min(len(state.bins) - 1, bisect_left(cumulative, max(target, 1e-9)))


def predict_idle_minutes(state: HistogramState) -> float:
    """The simple stand-in for the paper's ARIMA: median of the recent idle times."""
    if not state.recent:
        raise ValueError("no idle time observed")
    xs = sorted(state.recent)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def classify(state: HistogramState, params: HybridParams = PAPER) -> Pattern:
    """Which branch of the policy applies to this histogram."""
    if state.total < max(1, params.min_samples):
        return "warmup"
    if state.oob / state.total >= params.oob_threshold:
        return "oob"
    if coefficient_of_variation(state) < params.cv_threshold:
        return "flat"
    return "histogram"


def windows(state: HistogramState, params: HybridParams = PAPER) -> Windows:
    """The pre-warm and keep-alive windows (seconds) that the histogram calls for.

    Memoised (the autoscaler asks on every tick; the histogram changes only on arrivals);
    the cache is transparent: the result depends on the arguments alone.
    """
    return _windows(state, params)


@lru_cache(maxsize=1024)
def _windows(state: HistogramState, params: HybridParams) -> Windows:
    pattern = classify(state, params)
    if pattern == "histogram":
        head = percentile_bin(state, params.head_pct)
        tail = percentile_bin(state, params.tail_pct)
        prewarm = head * BIN_S * (1.0 - params.margin)
        end = (tail + 1) * BIN_S * (1.0 + params.margin)
        result = Windows(prewarm, end - prewarm)
    elif pattern == "oob":
        predicted_s = predict_idle_minutes(state) * 60.0
        result = Windows(
            predicted_s * (1.0 - params.predict_margin), predicted_s * 2 * params.predict_margin
        )
    else:
        result = Windows(0.0, params.fallback_keepalive_s)
    if result.keepalive_s < params.min_keepalive_s:
        result = Windows(result.prewarm_s, params.min_keepalive_s)
    return result
