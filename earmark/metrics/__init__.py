"""Metrics: one accuracy matrix per run, every continual-learning metric derived from it, and tables."""

from earmark.metrics.accuracy import AccuracyMatrix
from earmark.metrics.report import format_table

__all__ = ["AccuracyMatrix", "format_table"]
