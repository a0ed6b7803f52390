"""Class names to text embeddings: the CLIP zero-shot recipe, cached per name.

A class's embedding is the mean of the unit embeddings of every template filled with its name
(the 80 OpenAI ImageNet templates by default, from open_clip's zero-shot metadata), renormalised.
Probabilities use the CLIP teacher's learned temperature (``logit_scale``, at most 100).

The cache holds one embedding per (name, template set), so a name computed for one label set or
phrase list is reused by every later call that names it, and it is bounded (least recently used
first out, ``TEXT_CACHE_SIZE`` names): a server answering arbitrary labels keeps a fixed memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence, Tuple

import open_clip.zero_shot_metadata as zsm
import torch
import torch.nn.functional as F

from fastsamclip.predictor.engine import check_finite_outputs

# CLIP's learned temperature is clamped at 100 in training; used when a text tower has none.
DEFAULT_LOGIT_SCALE = 100.0
TEXT_BATCH = 256  # prompts per text-tower forward
# Names whose embeddings stay cached: 4096 x E floats, 12 MB at E = 768 (ViT-L/14's text width).
TEXT_CACHE_SIZE = 4096


def check_labels(labels: Sequence[str]) -> Tuple[str, ...]:
    """A non-empty tuple of distinct non-empty class names, or a ValueError/TypeError naming the problem."""
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of class names, got the string {labels!r} "
                        "(write [\"cat\", \"dog\"], not \"cat,dog\")")
    labels = tuple(labels)
    if not labels:
        raise ValueError("the label list is empty: give at least one class name")
    bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip()]
    if bad:
        raise ValueError(f"every label must be a non-empty string, got {bad!r}")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"labels repeat: {dup} (each class once, or the argmax is ambiguous)")
    return labels


def templates_for(templates) -> Tuple[Callable[[str], str], ...]:
    """"openai" (the 80 prompts of the CLIP paper), "simple", or a list of callables / format strings."""
    if templates in (None, "openai"):
        return tuple(zsm.OPENAI_IMAGENET_TEMPLATES)
    if templates == "simple":
        return tuple(zsm.SIMPLE_IMAGENET_TEMPLATES)
    if isinstance(templates, str):
        raise ValueError(f"templates must be 'openai', 'simple' or a list, got {templates!r}")
    out = tuple((lambda c, t=t: t.format(c)) if isinstance(t, str) else t for t in templates)
    if not out:
        raise ValueError("the template list is empty")
    return out


def templates_key(templates) -> Hashable:
    """The cache's name of a template set: the set's name, or its format strings (a callable by identity)."""
    if templates is None or isinstance(templates, str):
        return templates or "openai"
    return tuple(t if isinstance(t, str) else id(t) for t in templates)


class TextEmbeddings:
    """(L, E) unit class embeddings of a model's text tower; each name computed once per template
    set and kept in a bounded least-recently-used cache (see the module docstring)."""

    def __init__(self, model, device: torch.device, max_cached: int = TEXT_CACHE_SIZE):
        self.model, self.device, self.max_cached = model, device, max_cached
        self._cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()  # (name, templates key) -> (E,)

    def logit_scale(self) -> float:
        """The CLIP teacher's temperature (its learned ``logit_scale``, at most 100)."""
        ls = getattr(self.model.text, "logit_scale", None)
        return float(min(ls.exp().item(), 100.0)) if isinstance(ls, torch.Tensor) else DEFAULT_LOGIT_SCALE

    @torch.no_grad()
    def __call__(self, labels: Sequence[str], templates="openai") -> torch.Tensor:
        labels = check_labels(labels)
        tmpl = templates_for(templates)
        tkey = templates_key(templates)
        missing = [lab for lab in labels if (lab, tkey) not in self._cache]
        if missing:
            prompts = [t(lab) for lab in missing for t in tmpl]
            tokens = self.model.tokenizer(prompts)
            emb = torch.cat([self.model.encode_text(tokens[i:i + TEXT_BATCH].to(self.device), normalize=True)
                             for i in range(0, len(prompts), TEXT_BATCH)])
            emb = emb.float().view(len(missing), len(tmpl), -1).mean(1)
            check_finite_outputs("text tower", {"text embeddings": emb})
            emb = F.normalize(emb, dim=-1)
            for lab, e in zip(missing, emb):
                self._cache[(lab, tkey)] = e
        for lab in labels:
            self._cache.move_to_end((lab, tkey))
        out = torch.stack([self._cache[(lab, tkey)] for lab in labels])
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return out
