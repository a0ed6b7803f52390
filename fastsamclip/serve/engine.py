"""The model side of the server: a batch of validated tasks -> one answer per task.

Dynamic batching happens at the backbone: the tasks of a batch are grouped by the pass they need
(:func:`fastsamclip.serve.requests.geometry_of`: SAM geometry at a side, or CLIP's), each group
runs ONE batched ``SAMCLIPPredictor.forward``, then every task runs its own head on its slice of
that pass, through the predictor's public methods so that its answer is the predictor's:

* ``embed``: the pass's ``clip`` (and ``sam``) row, as ``SAMCLIPPredictor.embed_images``;
* ``segment``: the predictor's image state is set from the pass (what ``set_image`` stores:
  ``features``, ``clip_embedding``, ``clip_patches``, ``original_size``, ``input_size``), then
  ``SAMCLIPPredictor.segment``;
* ``classify``: ``SAMCLIPPredictor.classify``'s arithmetic on the pass's pooled CLIP rows;
* ``semantic``: composed mode as ``segment`` then ``semantic_segment(None, ...)``; clip mode with
  the functions of ``fastsamclip.predictor.semantic`` on the pass's per-patch rows;
* ``everything``: as ``segment`` (plus the original image, which the generator crops), then
  ``SAMCLIPPredictor.generate(None, ...)``: the batched pass serves the full-image crop, crop
  layers (when asked) run their own passes;
* ``concepts``: as ``segment`` (``image_id`` too), then ``SAMCLIPPredictor.segment_text(None, phrases, ...)``.
* ``image``: the pass is kept (:class:`~fastsamclip.serve.cache.PassCache`) under the image's id,
  and the label texts' embeddings are computed; a later ``segment``, ``everything``, ``concepts``
  or composed ``semantic`` task naming that ``image_id`` runs no pass: the predictor's image state
  is set from the kept one (an id no longer kept: a 404). ``segment`` with ``labels`` names each mask as
  ``generate`` does (:func:`name_low_res`).

A task whose parameters the model refuses (a prompt outside the image: the predictor's
ValueError) gets a 422 for itself alone; the rest of the batch is answered. With ``compile=True``
batches are padded to a power of two (at most ``max_batch``), so that a handful of compiled
shapes, all compiled at warm-up, cover every batch.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastsamclip.errors import NonFiniteOutputError
from fastsamclip.files import finite_or_none
from fastsamclip.predictor import SAMCLIPPredictor, SemanticResult
from fastsamclip.predictor.everything import mask_patch_weights, name_masks
from fastsamclip.predictor.semantic import clip_result
from fastsamclip.serve.cache import ImagePass, PassCache
from fastsamclip.serve.requests import unknown_image
from fastsamclip.serve.rle import encode_rle

log = logging.getLogger("fastsamclip.serve")

# Errors that mean "this request's parameters do not fit the model or the image": a 422 for it.
TASK_ERRORS = (ValueError, TypeError)
CACHED = ("kept", 0)  # the group of tasks that run on a kept pass (no backbone pass)


class NotKept(LookupError):
    """A task names an image this worker's cache no longer has: a 404 for it."""


def name_low_res(predictor: SAMCLIPPredictor, low_res: torch.Tensor, labels, templates) -> Tuple[list, list]:
    """Names of masks given as low-res logits (P, K, 4gh, 4gw) of the current image: (P, K) best
    labels and their probabilities, by ``generate``'s pooling of the per-patch CLIP embeddings
    (:func:`fastsamclip.predictor.everything.name_masks`)."""
    p, k = low_res.shape[:2]
    patches = predictor.clip_patches[0]
    lowres_px = predictor.img_size / low_res.shape[-1]  # input pixels per low-res cell
    valid = tuple(int(np.ceil(s / lowres_px)) for s in predictor.input_size)
    weights = mask_patch_weights(low_res.reshape(p * k, *low_res.shape[-2:]), tuple(patches.shape[:2]), valid)
    probs, _ = name_masks(weights, patches, predictor.text_embeddings(labels, templates), predictor.logit_scale())
    score, best = probs.max(-1)
    names = [labels[i] for i in best.tolist()]
    return ([names[r * k:(r + 1) * k] for r in range(p)], score.reshape(p, k).tolist())


def padded_sizes(max_batch: int) -> Tuple[int, ...]:
    """Powers of two below ``max_batch``, and ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (max_batch,)


def tensor_b64(t: torch.Tensor) -> Dict[str, Any]:
    """A float32 tensor as ``{"shape", "dtype", "data": base64 of its little-endian bytes}``."""
    a = np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32", "data": base64.b64encode(a.tobytes()).decode("ascii")}


def semantic_json(res: SemanticResult) -> Dict[str, Any]:
    present = [int(c) for c in np.unique(res.label_map) if c >= 0]
    out = {"labels": list(res.labels), "mode": res.mode, "size": list(res.label_map.shape),
           "present": [res.labels[c] for c in present],
           "masks": {res.labels[c]: encode_rle(res.label_map == c) for c in present},
           "class_scores": [float(v) for v in res.class_scores]}
    if res.mode == "composed":
        out["prompted"] = [res.labels[c] for c in res.prompted]
        out["points"] = {res.labels[c]: [list(p) for p in pts] for c, pts in res.points.items()}
    return out


class Engine:
    """Runs batches of tasks (dicts made by ``fastsamclip.serve.requests.make_task``)."""

    def __init__(self, predictor: SAMCLIPPredictor, max_batch: int = 8, cache: Optional[PassCache] = None) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.batches = 0
        self.cache = cache if cache is not None else PassCache(16, predictor.device)
        self.worker = {"pid": os.getpid(), "device": str(predictor.device)}  # who answered (several workers)

    # ------------------------------------------------------------------ start-up
    def warmup(self, classify_resolution: int = 224, semantic_resolution: int = 448) -> Dict[str, float]:
        """Every pass the defaults need, at every batch shape that will run (compiled: each shape
        compiles here, before the server says it is ready), and the tokenizer and text tower."""
        p = self.predictor
        sizes = padded_sizes(self.max_batch) if p.forward.compile else (1,)
        times = p.warmup(resolutions=(p.img_size,), batch_sizes=sizes, outputs=("set_image",))
        times.update(p.warmup(resolutions=(semantic_resolution,), batch_sizes=sizes, outputs=("set_image",)))
        times.update(p.warmup(resolutions=(classify_resolution,), batch_sizes=sizes, outputs=("clip",)))
        t0 = time.perf_counter()
        p.text_embeddings(("object",))
        times["text tower"] = time.perf_counter() - t0
        return times

    # ------------------------------------------------------------------ batches
    def _pass(self, kind: str, side: int, tasks: Sequence[dict]) -> Dict[str, torch.Tensor]:
        """One backbone pass over the tasks' pixels (SAM geometry: both heads; CLIP: pooled only)."""
        p = self.predictor
        x = torch.from_numpy(np.stack([t["pixels"] for t in tasks])).to(p.device)
        if kind == "sam":
            x = p.model.preprocess(x, [t["input_size"] for t in tasks])
            outputs = dict(clip=True, sam=True, clip_patches=True)
        else:
            x = p.model.preprocess(x)
            outputs = dict(clip=True, sam=False)
        n = x.shape[0]
        if p.forward.compile:
            target = next(s for s in padded_sizes(self.max_batch) if s >= n) if n <= self.max_batch else n
            if target > n:
                x = torch.cat([x, x.new_zeros((target - n, *x.shape[1:]))])
        out = p.forward(x, **outputs)  # in the predictor's dtype, fp32 out
        return {k: v[:n] for k, v in out.items()}

    @torch.no_grad()
    def run(self, tasks: Sequence[dict]) -> List[dict]:
        """One answer per task, in order: ``{"result": ...}`` or ``{"error", "status"}``, each
        with ``timings_ms`` and ``batch``."""
        start = time.monotonic()
        self.batches += 1
        groups: "OrderedDict[Tuple[str, int], List[int]]" = OrderedDict()
        for i, t in enumerate(tasks):
            groups.setdefault(CACHED if t["pass"] is None else tuple(t["pass"]), []).append(i)
        answers: List[dict] = [{} for _ in tasks]
        for key, idx in groups.items():
            kind, side = key
            t0 = time.perf_counter()
            try:
                out = {} if key == CACHED else self._pass(kind, side, [tasks[i] for i in idx])
                if self.predictor.device.type == "cuda":
                    torch.cuda.synchronize(self.predictor.device)
                failed = None
            except NonFiniteOutputError as e:  # the model's fault, not the request's: a 500 that says why
                log.error("%s", e)
                failed = str(e)
            except Exception as e:  # noqa: BLE001 -- every task of the pass gets the error, the server goes on
                log.exception("backbone pass failed")
                failed = f"the backbone pass failed: {type(e).__name__}: {e}"
            backbone_ms = (time.perf_counter() - t0) * 1e3
            for j, i in enumerate(idx):
                t1 = time.perf_counter()
                if failed:
                    answer = {"error": failed, "status": 500}
                else:
                    answer = self._answer(tasks[i], out, j)
                answer["timings_ms"] = {"queue": max(0.0, (start - tasks[i].get("submitted", start)) * 1e3),
                                        "backbone": backbone_ms, "head": (time.perf_counter() - t1) * 1e3}
                answer["batch"] = {"id": self.batches, "requests": len(tasks), "worker": self.worker,
                                   "backbone_batch": 0 if key == CACHED else len(idx),
                                   "pass": "kept" if key == CACHED else f"{kind} {side}px"}
                answers[i] = answer
        return answers

    def _answer(self, task: dict, out: Dict[str, torch.Tensor], j: int) -> dict:
        try:
            return {"result": self._head(task, out, j)}
        except NonFiniteOutputError as e:  # before TASK_ERRORS: an InputError, but of the model, not the request
            log.error("%s", e)
            return {"error": str(e), "status": 500}
        except NotKept as e:
            return {"error": str(e), "status": 404}
        except TASK_ERRORS as e:
            return {"error": str(e), "status": 422}
        except Exception as e:  # noqa: BLE001 -- a bug answers its own request with a 500, the server goes on
            log.exception("task %s failed", task["task"])
            return {"error": f"internal error: {type(e).__name__}: {e}", "status": 500}

    # ------------------------------------------------------------------ heads
    def _set_image_state(self, task: dict, out: Dict[str, torch.Tensor], j: int) -> None:
        """The predictor's current image: the kept pass the task names, or row ``j`` of the batched pass."""
        if task["pass"] is None:
            kept = self.cache.get(task["image_id"])
            if kept is None:
                raise NotKept(unknown_image(task["image_id"]))
            self.predictor.set_pass(kept.out, kept.original_size, kept.input_size, image=kept.image)
            return
        self.predictor.set_pass({k: out[k][j:j + 1] for k in ("sam", "clip", "clip_patches")},
                                task["original_size"], task["input_size"], image=task.get("image"))

    def _head(self, task: dict, out: Dict[str, torch.Tensor], j: int) -> dict:
        p, params, name = self.predictor, task["params"], task["task"]
        if name == "embed":
            result = {"clip_embedding": out["clip"][j].float().cpu().tolist(), "normalised": False}
            if params["sam"]:
                result["sam_embedding"] = tensor_b64(out["sam"][j])
            return result
        if name == "classify":
            labels = params["labels"]
            text = p.text_embeddings(labels, params["templates"])
            img = F.normalize(out["clip"][j:j + 1].float(), dim=-1)
            probs = (p.logit_scale() * img @ text.T).softmax(-1)[0].cpu()
            return {"labels": list(labels), "probs": probs.tolist(), "label": labels[int(probs.argmax())]}
        if name == "image":
            kept = ImagePass({k: out[k][j:j + 1] for k in ("sam", "clip", "clip_patches")}, task["original_size"],
                             task["input_size"], task["image"])
            self.cache.put(task["image_id"], kept)
            if params["labels"] is not None:
                p.text_embeddings(params["labels"], params["templates"])
            return {"image_id": task["image_id"], "size": list(task["original_size"]),
                    "input_size": list(task["input_size"])}
        if name == "segment":
            self._set_image_state(task, out, j)
            try:
                masks, scores, low_res = p.segment(points=params["points"], point_labels=params["point_labels"],
                                                   boxes=params["boxes"], multimask_output=params["multimask_output"])
                result = {"size": list(task["original_size"]), "scores": scores.tolist(),
                          "masks": [[encode_rle(m) for m in prompt] for prompt in masks]}
                if params["labels"] is not None:
                    result["label"], result["label_score"] = name_low_res(p, torch.from_numpy(low_res).to(p.device),
                                                                          params["labels"], params["templates"])
            finally:
                p.reset_image()
            return result
        if name == "semantic":
            if params["mode"] == "composed":
                self._set_image_state(task, out, j)
                try:
                    res = p.semantic_segment(None, params["labels"], mode="composed", threshold=params["threshold"],
                                             points_per_class=params["points_per_class"],
                                             templates=params["templates"])
                finally:
                    p.reset_image()
            else:
                res = self._semantic_clip(task, out, j)
            return semantic_json(res)
        if name == "everything":
            self._set_image_state(task, out, j)
            generator = {k: v for k, v in params.items() if k not in ("labels", "label_threshold", "templates", "image_id")}
            try:
                records = p.generate(None, labels=params["labels"], label_threshold=params["label_threshold"],
                                     templates=params["templates"], output_mode="coco_rle", **generator)
            finally:
                p.reset_image()
            return {"size": list(task["original_size"]), "count": len(records), "masks": finite_or_none(records)}
        if name == "concepts":
            self._set_image_state(task, out, j)
            try:
                records = p.segment_text(None, params["phrases"], output_mode="coco_rle",
                                         **{k: v for k, v in params.items() if k not in ("phrases", "image_id")})
            finally:
                p.reset_image()
            return {"size": list(task["original_size"]), "phrases": list(params["phrases"]),
                    "counts": {ph: sum(r["phrase"] == ph for r in records) for ph in params["phrases"]},
                    "count": len(records), "instances": finite_or_none(records)}
        raise ValueError(f"unknown task {name!r}")

    def _semantic_clip(self, task: dict, out: Dict[str, torch.Tensor], j: int) -> SemanticResult:
        """``semantic_segment(mode="clip")`` on the pass's per-patch row (segment_clip's steps)."""
        p, params = self.predictor, task["params"]
        labels, resolution = params["labels"], params["resolution"]
        return clip_result(out["clip_patches"][j:j + 1], p.text_embeddings(labels, params["templates"]),
                           p.logit_scale(), labels, task["input_size"], task["original_size"], resolution, p.patch_size)
