"""PNG plots of results; matplotlib with the Agg backend so no display is needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

JOINT = "joint-ridge"  # the joint ridge bound (see earmark.experiments.run), drawn dashed


def plot_sessions(results: dict, path: str | Path) -> Path:
    """Accuracy on all seen classes after each session, one line per learner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.cumsum([len(c) for c in results["scenario"]["session_classes"]])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, entry in results["learners"].items():
        acc = 100 * np.asarray(entry["seen_accuracy"])
        style = "--" if name == JOINT else "-"
        aa = entry["metrics"]["average_incremental_accuracy"]
        ax.plot(sizes, acc, style, marker="o", label=f"{name} (AA {100 * aa:.1f})")
    ax.set_xlabel("classes seen")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_title(f"{results['dataset']['name']}: accuracy per session")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def save_figure(fig, path: str | Path) -> Path:
    """``fig.savefig`` atomically: into a temporary file in the same folder, fsync, then ``os.replace``,
    so a crash leaves the old image or the new one, never a truncated file."""
    from earmark.checkpoint import atomic_write_with

    path = Path(path)
    atomic_write_with(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png"))
    return path
