"""The loss plot: a real PNG, written without touching matplotlib's global state."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is optional (the plot extra)")


def test_plot_is_a_png_and_leaves_pyplot_alone(tmp_path):
    code = (
        "import sys; from scratchgpt.plot import plot_losses\n"
        f"assert plot_losses([0, 512, 1024], [10.9, 7.1, 6.0], [10.8, 7.3, 6.4], {str(tmp_path / 'loss.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    data = (tmp_path / "loss.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp*"))  # no temporary file left beside it
