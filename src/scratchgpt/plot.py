"""The picture the seed shows: train and validation loss against tokens seen (and, beside
them, a task's other metrics, such as a classifier's accuracy).

matplotlib is optional (`pip install scratchgpt[plot]`); without it the plot is
skipped with one warning and training goes on.
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping, Sequence

from .fileio import atomic_write

_warned = False


def plot_losses(tokens_seen: Sequence[int], train_losses: Sequence[float], val_losses: Sequence[float],
                path: str | os.PathLike,
                metrics: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> bool:
    """Write a PNG of both loss curves to `path` (atomically); False when matplotlib is missing.

    `metrics` adds a panel beside it per other metric a task reports, e.g.
    {"accuracy": (train_values, val_values)}, against the same tokens seen.
    """
    global _warned
    try:
        from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry
    except ImportError:
        if not _warned:
            warnings.warn("matplotlib is not installed: skipping the loss plot (pip install matplotlib)",
                          stacklevel=2)
            _warned = True
        return False
    panels = {"loss": (train_losses, val_losses), **(metrics or {})}
    fig = Figure(figsize=(6 * len(panels), 4))
    for ax, (name, (train_values, val_values)) in zip(fig.subplots(1, len(panels), squeeze=False)[0],
                                                       panels.items()):
        ax.plot(tokens_seen, train_values, label=f"train {name}")
        ax.plot(tokens_seen, val_values, linestyle="-.", label=f"val {name}")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats)" if name == "loss" else name)
        ax.legend(loc="upper right" if name == "loss" else "lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return True


def plot_history(history: Mapping[str, Sequence[float]], path: str | os.PathLike) -> bool:
    """`plot_losses` of a Trainer's history: "tokens", "train" and "val" (the losses) and the
    task's other metrics as "train_NAME" / "val_NAME" pairs (a classifier's accuracy)."""
    names = [key.removeprefix("val_") for key in history if key.startswith("val_")]
    metrics = {name: (history[f"train_{name}"], history[f"val_{name}"]) for name in names
               if f"train_{name}" in history}
    return plot_losses(history["tokens"], history["train"], history["val"], path, metrics)
