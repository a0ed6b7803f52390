"""Pictures people would rather look at than read: masks drawn over their image, with a legend."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def draw_overlay(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], path: str,
                 title: str = "", prompts: Optional[List[dict]] = None) -> Optional[str]:
    """The picture with each mask in its own colour, the prompts drawn, and a legend; the PNG path,
    or None when matplotlib (optional) is not installed."""
    try:
        import matplotlib  # optional: extras "bench" / "test"

        matplotlib.use("Agg")
        import matplotlib.patches as mpatches
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    handles = []
    for i, (m, lab) in enumerate(zip(masks, labels)):
        rgba = np.zeros((*m.shape, 4))
        rgba[m] = (*colours(i)[:3], 0.45)
        ax.imshow(rgba)
        handles.append(mpatches.Patch(color=colours(i), label=lab))
    for p in prompts or []:
        if "point" in p:
            ax.plot(*p["point"], marker="*", color="yellow", markersize=14, markeredgecolor="black")
        if "box" in p:
            x0, y0, x1, y1 = p["box"]
            ax.add_patch(mpatches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=2))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
