"""Datasets: the common dataset object, the loaders registry, and earmark's own rendered dataset."""

from earmark.data.base import DATASETS, DatasetLayoutError, load_dataset
from earmark.data.dataset import AudioDataset
from earmark.data.esc50 import load_esc50
from earmark.data.fewshot import load_fsc89, load_ls100, load_nsynth100
from earmark.data.folder import load_folder, load_manifest
from earmark.data.nsynth import load_nsynth
from earmark.data.render import RenderConfig, default_data_dir, render_default_dataset
from earmark.data.speech_commands import load_speech_commands
from earmark.data.urbansound8k import load_urbansound8k

__all__ = [
    "DATASETS",
    "AudioDataset",
    "DatasetLayoutError",
    "RenderConfig",
    "default_data_dir",
    "load_dataset",
    "load_esc50",
    "load_folder",
    "load_fsc89",
    "load_ls100",
    "load_manifest",
    "load_nsynth",
    "load_nsynth100",
    "load_speech_commands",
    "load_urbansound8k",
    "render_default_dataset",
]
