"""Autoscaling policies as pure functions: (stats, config[, state]) -> desired containers.

``decide()`` is the fixed ``scaledown_window`` policy; ``scale()`` dispatches on
``AutoscalerConfig.keepalive`` to it or to the adaptive / hybrid histogram policies, which
keep a ``PolicyState`` per function (see ``autoscaler.adaptive`` for the loop's contract).
"""

from strato.server.autoscaler.adaptive import (
    PolicyState,
    Scaled,
    keepalive_for,
    observe_arrival,
    observe_drained,
    scale,
)
from strato.server.autoscaler.policy import (
    AutoscalerConfig,
    ContainerStat,
    FunctionStats,
    ScalingDecision,
    decide,
    desired_containers,
)

__all__ = [
    "AutoscalerConfig",
    "ContainerStat",
    "FunctionStats",
    "PolicyState",
    "Scaled",
    "ScalingDecision",
    "decide",
    "desired_containers",
    "keepalive_for",
    "observe_arrival",
    "observe_drained",
    "scale",
]
