"""The picture the seed shows: train and validation loss against tokens seen.

matplotlib is optional (`pip install scratchgpt[plot]`); without it the plot is
skipped with one warning and training goes on.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

from .fileio import atomic_write

_warned = False


def plot_losses(tokens_seen: Sequence[int], train_losses: Sequence[float], val_losses: Sequence[float],
                path: str | os.PathLike) -> bool:
    """Write a PNG of both loss curves to `path` (atomically); False when matplotlib is missing."""
    global _warned
    try:
        from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry
    except ImportError:
        if not _warned:
            warnings.warn("matplotlib is not installed: skipping the loss plot (pip install matplotlib)",
                          stacklevel=2)
            _warned = True
        return False
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(tokens_seen, train_losses, label="train loss")
    ax.plot(tokens_seen, val_losses, linestyle="-.", label="val loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return True
