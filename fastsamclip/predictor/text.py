"""Class names to text embeddings: the CLIP zero-shot recipe, cached per label set.

A class's embedding is the mean of the unit embeddings of every template filled with its name
(the 80 OpenAI ImageNet templates by default, from open_clip's zero-shot metadata), renormalised.
Probabilities use the CLIP teacher's learned temperature (``logit_scale``, at most 100).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import open_clip.zero_shot_metadata as zsm
import torch
import torch.nn.functional as F

from fastsamclip.predictor.engine import check_finite_outputs

# CLIP's learned temperature is clamped at 100 in training; used when a text tower has none.
DEFAULT_LOGIT_SCALE = 100.0
TEXT_BATCH = 256  # prompts per text-tower forward


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


class TextEmbeddings:
    """(L, E) unit class embeddings of a model's text tower, computed once per (labels, templates)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self._cache: Dict[tuple, torch.Tensor] = {}

    def logit_scale(self) -> float:
        """The CLIP teacher's temperature (its learned ``logit_scale``, at most 100)."""
        ls = getattr(self.model.text, "logit_scale", None)
        return float(min(ls.exp().item(), 100.0)) if isinstance(ls, torch.Tensor) else DEFAULT_LOGIT_SCALE

    @torch.no_grad()
    def __call__(self, labels: Sequence[str], templates="openai") -> torch.Tensor:
        labels = check_labels(labels)
        tmpl = templates_for(templates)
        key = (labels, templates if isinstance(templates, str) or templates is None else id(templates))
        if key not in self._cache:
            prompts = [t(lab) for lab in labels for t in tmpl]
            tokens = self.model.tokenizer(prompts)
            emb = torch.cat([self.model.encode_text(tokens[i:i + TEXT_BATCH].to(self.device), normalize=True)
                             for i in range(0, len(prompts), TEXT_BATCH)])
            emb = emb.float().view(len(labels), len(tmpl), -1).mean(1)
            check_finite_outputs("text tower", {"text embeddings": emb})
            self._cache[key] = F.normalize(emb, dim=-1)
        return self._cache[key]
