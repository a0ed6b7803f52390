"""Pictures people would rather look at than read: masks drawn over their image, with a legend.

Both pictures share one way of drawing: the image and its masks are reduced to at most
``MAX_SIDE`` pixels on the longest side before anything is drawn (a 9000 x 7000 photo is drawn
from a 1500 x 1167 copy: matplotlib would otherwise hold float RGBA copies of the full picture per
mask, GBs and tens of seconds), the masks are blended into ONE uint8 picture (largest first, so a
smaller mask on top of a larger one stays visible) and each mask is outlined in its colour, so
overlapping masks stay distinguishable. Prompts carry the legend's name ("point 0", "box 1"), which
is written beside each of their points and boxes.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

MAX_SIDE = 1500  # longest side of the drawn picture, pixels
FILL_ALPHA = 0.45  # mask fill opacity


def _pyplot():
    try:
        import matplotlib  # optional: extras "bench" / "test"

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _reduced(image: np.ndarray, max_side: int) -> Tuple[np.ndarray, int]:
    """The picture reduced by an integer factor so its longest side is at most ``max_side``
    (PIL's box-filter ``reduce``: fast, no float copy of the full picture), and the factor."""
    step = max(1, math.ceil(max(image.shape[:2]) / max_side))
    if step == 1:
        return image, 1
    return np.asarray(Image.fromarray(image).reduce(step)), step


def _small_mask(mask: np.ndarray, step: int, shape: Tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)[::step, ::step]
    return m[:shape[0], :shape[1]]


def _outline(m: np.ndarray, width: int = 2) -> np.ndarray:
    """The mask's boundary band, ``width`` pixels inside it (pixels within ``width`` 4-neighbour
    steps of the outside): 2 px stays visible when a 1500 px picture is shown smaller."""
    inner = m
    for _ in range(width):
        prev = inner
        inner = prev.copy()
        inner[1:] &= prev[:-1]
        inner[:-1] &= prev[1:]
        inner[:, 1:] &= prev[:, :-1]
        inner[:, :-1] &= prev[:, 1:]
    return m & ~inner


def _blend(image: np.ndarray, masks: List[np.ndarray], colours: List[Tuple[float, float, float]]) -> np.ndarray:
    out = image.astype(np.float32)
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    for i in order:
        out[masks[i]] = out[masks[i]] * (1 - FILL_ALPHA) + np.float32(255 * FILL_ALPHA) * np.asarray(colours[i])
    for i in order:  # outlines after all fills, so none is painted over
        out[_outline(masks[i])] = 255 * np.asarray(colours[i])
    return out.astype(np.uint8)


def _figure(plt, shape: Tuple[int, int]):
    """A figure of the picture's aspect, 6 to 15 inches wide at 100 dpi."""
    h, w = shape
    width = min(max(w / 100, 6.0), 15.0)
    return plt.subplots(figsize=(width, max(width * h / w, 2.0)))


def _label_point(m: np.ndarray) -> Optional[Tuple[float, float]]:
    """(x, y) of the mask pixel nearest its centroid (a centroid can fall outside a ring)."""
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return float(xs[k]), float(ys[k])


def _draw_prompts(ax, prompts: Sequence[dict], step: int) -> None:
    for p in prompts:
        name = p.get("name")
        points = list(p.get("points") or [])
        if "point" in p:
            points.append((*p["point"], 1))
        for pt in points:
            x, y = pt[0] / step, pt[1] / step
            fg = len(pt) < 3 or int(pt[2]) == 1
            ax.plot(x, y, marker="*" if fg else "X", color="yellow" if fg else "red", markersize=14 if fg else 10,
                    markeredgecolor="black")
            if name:
                ax.annotate(name, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8, color="black",
                            bbox=dict(boxstyle="round,pad=0.15", fc="yellow", alpha=0.8, lw=0))
        if p.get("box") is not None:
            x0, y0, x1, y1 = (v / step for v in p["box"])
            ax.add_patch(_patches().Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=2))
            if name:
                ax.annotate(name, (x0, y0), xytext=(2, 2), textcoords="offset points", fontsize=8, color="black",
                            va="bottom", bbox=dict(boxstyle="round,pad=0.15", fc="yellow", alpha=0.8, lw=0))


def _patches():
    import matplotlib.patches as mpatches  # optional, as _pyplot

    return mpatches


def _save(fig, plt, ax, title: str, path: str) -> str:
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_overlay(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], path: str,
                 title: str = "", prompts: Optional[List[dict]] = None, max_side: int = MAX_SIDE) -> Optional[str]:
    """The picture with each mask in its own colour and outline, the prompts drawn, and a legend
    (``labels``, one per mask); the PNG path, or None when matplotlib (optional) is not installed.

    prompts: dicts with ``name`` (the legend's, written beside the prompt), ``points`` [(x, y) or
    (x, y, label 1 foreground / 0 background)], ``box`` (x0, y0, x1, y1); ``point`` (x, y) is one
    foreground point. Coordinates in original image pixels.
    """
    plt = _pyplot()
    if plt is None:
        return None
    small, step = _reduced(np.asarray(image), max_side)
    colours = plt.get_cmap("tab10")
    cols = [tuple(colours(i % 10)[:3]) for i in range(len(masks))]
    ms = [_small_mask(m, step, small.shape[:2]) for m in masks]
    fig, ax = _figure(plt, small.shape[:2])
    ax.imshow(_blend(small, ms, cols))
    _draw_prompts(ax, prompts or [], step)
    handles = [_patches().Patch(color=c, label=lab) for c, lab in zip(cols, labels)]
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    return _save(fig, plt, ax, title, path)


def draw_named_masks(image: np.ndarray, masks: Sequence[np.ndarray], names: Sequence[Optional[str]], path: str,
                     title: str = "", max_side: int = MAX_SIDE, captions: Optional[Sequence[str]] = None
                     ) -> Optional[str]:
    """Every mask of a picture ("segment everything", or every instance of some phrases), each
    outlined and with its name written on it.

    names: one per mask; masks of one name share its colour (the legend: name and count), a
    mask without a name (None) gets its own colour and its index as text. captions: what to write
    on each mask instead of its name (e.g. the name with a score). Returns the PNG path, or None
    without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return None
    small, step = _reduced(np.asarray(image), max_side)
    named = list(dict.fromkeys(n for n in names if n is not None))
    cmap, spare = plt.get_cmap("tab20"), plt.get_cmap("Set3")
    by_name: Dict[str, tuple] = {n: tuple(cmap(i % 20)[:3]) for i, n in enumerate(named)}
    cols = [by_name[n] if n is not None else tuple(spare(i % 12)[:3]) for i, n in enumerate(names)]
    ms = [_small_mask(m, step, small.shape[:2]) for m in masks]
    fig, ax = _figure(plt, small.shape[:2])
    ax.imshow(_blend(small, ms, cols))
    for i, (m, n) in enumerate(zip(ms, names)):
        at = _label_point(m)
        if at is not None:
            text = captions[i] if captions is not None else n if n is not None else f"#{i}"
            ax.text(*at, text, fontsize=7, color="white", ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.55, lw=0))
    counts = {n: sum(1 for x in names if x == n) for n in named}
    handles = [_patches().Patch(color=by_name[n], label=f"{n} ({counts[n]})") for n in named]
    unnamed = sum(1 for x in names if x is None)
    if unnamed:
        handles.append(_patches().Patch(color=(0.8, 0.8, 0.8), label=f"unnamed ({unnamed})"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7)
    return _save(fig, plt, ax, title, path)
