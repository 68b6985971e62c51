"""What every report page shares: writing a matplotlib figure, embedding a PNG, formatting a number.

Light on purpose (matplotlib, no torch): the tune's page is drawn from tune.json alone.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deradiff.fileio import atomic_path  # noqa: E402


def finish_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> None:
    """Axis labels and legend, then write the PNG atomically (no half-written file under its name) and free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def embed_png(path: Path) -> str:
    """A data: URL, so a page is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def fmt(value: Any) -> str:
    """A float in 4 significant digits (inf / nan spelled out), a bool as yes / no, anything else escaped text;
    None is blank."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else f"{value:.4g}")
    return html.escape(str(value))
