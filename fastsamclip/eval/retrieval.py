"""Zero-shot image-text retrieval on a Karpathy split: recall@1/5/10 in both directions.

Protocol (CLIP's): unit image embeddings (CLIP geometry at ``--resolution``) against unit
caption embeddings (the raw captions, no template); image-to-text R@K = percent of images with
any of their captions among the K best captions; text-to-image R@K = percent of captions whose
image is among the K best images. Ties resolve to the lower index (see ``metrics``). The first
``--captions-per-image`` (5) captions of each image are used, the Karpathy test splits' 5 per
image (1000 images / 5000 captions for Flickr30k, 5000 / 25000 for COCO). "R@1" in the results
is the mean of the two directions' R@1 (DataComp's ``mean_recall@1``); both directions are
reported. An image that cannot be decoded is left out with its captions, and listed.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsamclip.eval.common import read_rgb_or_skip
from fastsamclip.eval.datasets import RetrievalDataset
from fastsamclip.eval.metrics import best_rank_of_positives, stable_ranks
from fastsamclip.eval.models import EvalModel
from fastsamclip.eval.runner import Dist, RankResult, gather_results, iterate

KS = (1, 5, 10)
QUERY_CHUNK = 1024  # queries ranked at once (bounds the (Q, N) comparison tensors)


def _load(item):
    index, path = item
    rgb, skip = read_rgb_or_skip(path, index)
    return index, rgb, skip


def recalls(sim: torch.Tensor, caption_image: torch.Tensor) -> dict:
    """sim (I, T) image-caption scores, caption_image (T,) -> {"i2t_R@K", "t2i_R@K", "R@K"}."""
    n_img = sim.shape[0]
    i2t, t2i = [], []
    positives = caption_image[None, :] == torch.arange(n_img, device=sim.device)[:, None]  # (I, T)
    for s in range(0, n_img, QUERY_CHUNK):
        i2t.append(best_rank_of_positives(sim[s:s + QUERY_CHUNK], positives[s:s + QUERY_CHUNK]))
    sim_t = sim.T
    for s in range(0, sim_t.shape[0], QUERY_CHUNK):
        t2i.append(stable_ranks(sim_t[s:s + QUERY_CHUNK], caption_image[s:s + QUERY_CHUNK]))
    i2t_r, t2i_r = torch.cat(i2t), torch.cat(t2i)
    out = {}
    for k in KS:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t_r < k).double().mean())
        out[f"t2i_R@{k}"] = 100.0 * float((t2i_r < k).double().mean())
    for k in KS:
        out[f"R@{k}"] = (out[f"i2t_R@{k}"] + out[f"t2i_R@{k}"]) / 2
    return out


def run_shard(model: EvalModel, ds: RetrievalDataset, image_items, caption_items, resolution: int, batch_size: int,
              workers: int, progress: bool) -> RankResult:
    img_rows, skipped = [], []
    for batch in iterate(image_items, _load, batch_size, workers, progress, f"retrieval {ds.name}"):
        good = [(i, rgb) for i, rgb, skip in batch if skip is None]
        skipped += [skip for _, _, skip in batch if skip is not None]
        if good:
            emb = model.image_embeddings([rgb for _, rgb in good], resolution).cpu()
            img_rows += [(i, e) for (i, _), e in zip(good, emb)]
    cap_rows = []
    for s in range(0, len(caption_items), max(1, batch_size) * 8):
        part = caption_items[s:s + max(1, batch_size) * 8]
        emb = model.text_embeddings([ds.captions[j] for j in part]).cpu()
        cap_rows += list(zip(part, emb))
    return RankResult({"images": img_rows, "captions": cap_rows}, len(img_rows), skipped)


def evaluate(model: EvalModel, ds: RetrievalDataset, d: Dist, resolution: int, batch_size: int = 32, workers: int = 0,
             limit: Optional[int] = None, progress: bool = False):
    n_img = min(limit, len(ds.images)) if limit else len(ds.images)
    captions = [j for j, owner in enumerate(ds.caption_image) if owner < n_img]
    image_items = [(i, ds.images[i]) for i in d.shard(n_img)]
    caption_items = [captions[k] for k in d.shard(len(captions))]
    gathered = gather_results(d, run_shard(model, ds, image_items, caption_items, resolution, batch_size, workers, progress))
    if gathered is None:
        return None
    skipped = [s for g in gathered for s in g.skipped]
    images = sorted(((i, e) for g in gathered for i, e in g.state["images"]), key=lambda t: t[0])
    if not images:
        return {"metrics": None, "evaluated": 0, "skipped": skipped}
    kept = {i: k for k, (i, _) in enumerate(images)}
    caps = sorted(((j, e) for g in gathered for j, e in g.state["captions"] if ds.caption_image[j] in kept),
                  key=lambda t: t[0])
    img = torch.stack([e for _, e in images])
    txt = torch.stack([e for _, e in caps])
    owner = torch.tensor([kept[ds.caption_image[j]] for j, _ in caps])
    metrics = recalls(img @ txt.T, owner)
    metrics.update({"images": len(images), "captions": len(caps)})
    return {"metrics": metrics, "evaluated": len(images), "skipped": skipped}
