"""Scenarios: how a dataset is cut into incremental sessions."""

from earmark.scenarios.class_incremental import ClassIncremental, Session

__all__ = ["ClassIncremental", "Session"]
