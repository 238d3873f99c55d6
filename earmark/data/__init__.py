"""Datasets: the common dataset object, the loaders registry, and earmark's own rendered dataset."""

from earmark.data.base import DATASETS, DatasetLayoutError, load_dataset
from earmark.data.dataset import AudioDataset
from earmark.data.esc50 import load_esc50
from earmark.data.render import RenderConfig, default_data_dir, render_default_dataset

__all__ = [
    "DATASETS",
    "AudioDataset",
    "DatasetLayoutError",
    "RenderConfig",
    "default_data_dir",
    "load_dataset",
    "load_esc50",
    "render_default_dataset",
]
