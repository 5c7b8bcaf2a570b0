"""Autoscaling policies as pure functions: (stats, config) -> desired containers."""

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
    "ScalingDecision",
    "decide",
    "desired_containers",
]
