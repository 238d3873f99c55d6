"""Scenarios: how a dataset is cut into incremental sessions."""

from earmark.scenarios.blurry import BlurryIncremental
from earmark.scenarios.class_incremental import ClassIncremental, Session
from earmark.scenarios.online import OnlineResult, StreamBatch, evaluate_online, online_stream
from earmark.scenarios.registry import SCENARIOS

__all__ = [
    "SCENARIOS",
    "BlurryIncremental",
    "ClassIncremental",
    "OnlineResult",
    "Session",
    "StreamBatch",
    "evaluate_online",
    "online_stream",
]
