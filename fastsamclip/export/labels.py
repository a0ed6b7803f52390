"""The text embeddings of a label set in one small file, so an edge application classifies with
the exported encoder alone: no text tower, no tokenizer.

``text_embeddings.npz`` (numpy only to read, ``np.load(path)``, no pickle):

- ``embeddings`` (L, E) float32: unit class embeddings, the CLIP zero-shot recipe
  (``SAMCLIPPredictor.text_embeddings``: the mean of the unit embeddings of the 80 OpenAI
  templates filled with each name, renormalised);
- ``labels`` (L,) unicode: the class names in order;
- ``logit_scale`` () float32: the CLIP teacher's temperature (at most 100);
- ``templates`` () unicode: which template set was used.

Zero-shot probabilities from the encoder's pooled ``clip_embedding`` c (B, E)::

    z = c / |c|;  probs = softmax(logit_scale * z @ embeddings.T, axis=-1)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from fastsamclip.files import atomic_write
from fastsamclip.predictor import SAMCLIPPredictor

LABELS_FILE = "text_embeddings.npz"


def export_text_embeddings(predictor: SAMCLIPPredictor, labels: Sequence[str], path: str,
                           templates: str = "openai") -> dict:
    """Write ``path`` (see the module docstring); returns a summary for ``export.json``."""
    emb = predictor.text_embeddings(labels, templates).float().cpu().numpy().astype(np.float32)
    labels = tuple(labels)
    scale = np.float32(predictor.logit_scale())

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, embeddings=emb, labels=np.array(labels, dtype=str), logit_scale=scale,
                     templates=np.array(templates))

    atomic_write(path, write)
    return {"file": os.path.basename(path), "labels": list(labels), "shape": list(emb.shape),
            "logit_scale": float(scale), "templates": templates, "normalised": True}


def load_text_embeddings(path: str) -> dict:
    """``{"embeddings", "labels", "logit_scale", "templates"}`` from a file written above."""
    with np.load(path, allow_pickle=False) as data:
        return {"embeddings": data["embeddings"], "labels": [str(v) for v in data["labels"]],
                "logit_scale": float(data["logit_scale"]), "templates": str(data["templates"])}


def zero_shot_probs(clip_embedding: np.ndarray, text: dict) -> np.ndarray:
    """(B, E) pooled CLIP embeddings (not normalised) -> (B, L) probabilities."""
    z = np.asarray(clip_embedding, np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    logits = text["logit_scale"] * z @ np.asarray(text["embeddings"], np.float64).T
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)
