"""Training curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "", max_panels: int = 16) -> Path | None:
    """One panel per numeric metric in ``history`` (dicts with a ``step``); returns the PNG path."""
    from retrv_r1_plugin._optional import require

    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys: list[str] = []
    for row in history:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    keys = keys[:max_panels]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return out
