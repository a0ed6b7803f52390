"""What the frozen teachers say about a batch, and the prompts both sides of L_SAM see.

The teachers' image embeddings come from the teacher cache when it holds every entry of a batch,
otherwise they are computed live (and counted in ``misses``, reported at the end of a run). Both
the SAM teacher and the student decode the same prompts in the same (x, y) frame of the model
input, single-output (``multimask_output=False``), half of an image's drawn masks by their box and
half by their point (alternating in draw order) when both kinds are used.

At its native input size the SAM teacher is segment_anything's own code. At another SAM-stream
size (``--sam-image-size``) it follows as the student does: its image-encoder weights run in this
package's encoder, which resizes the position tables (ViTDet / SAM rules), and its prompts are
encoded for that input size and grid (``encode_prompts``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastsamclip.errors import ConfigError
from fastsamclip.modeling import build_backbone, encode_prompts, get_sam_config, infer_sam_type, sam_preprocess


def split_prompts(item: dict, prompt_types: Sequence[str], device: torch.device) -> Dict[str, object]:
    """An SA1BDataset item's prompts as ``{"boxes": (m, 4), "points": (coords (m, P, 2), labels (m, P))}``,
    mask ``j`` prompted by kind ``j % len(prompt_types)``."""
    m = item["gt_masks"].shape[0]
    kinds = list(prompt_types)
    out: Dict[str, object] = {}
    for j, kind in enumerate(kinds):
        sel = torch.arange(j, m, len(kinds))
        if len(sel) == 0:
            continue
        if kind == "box":
            out["boxes"] = item["boxes"][sel].to(device)
        else:
            out["points"] = (item["points"][sel].to(device), item["point_labels"][sel].to(device))
    return out


def _kind_kwargs(kind: str, value) -> dict:
    return {"points": value if kind == "points" else None, "boxes": value if kind == "boxes" else None}


def student_masks(student, emb: torch.Tensor, prompts: dict, input_size) -> torch.Tensor:
    """Student low-res logits (M, 1, h, w) for one image's prompts (in :func:`split_prompts` order)."""
    outs = [student.predict_masks(emb, input_size, multimask_output=False, **_kind_kwargs(k, v))[0]
            for k, v in prompts.items()]
    return torch.cat(outs).float()


@torch.no_grad()
def teacher_masks(sam, emb: torch.Tensor, prompts: dict) -> torch.Tensor:
    """SAM teacher low-res logits (M, 1, h, w) for the same prompts: segment_anything's prompt
    encoder at its native grid, the same arithmetic for the embedding's grid otherwise."""
    pe = sam.prompt_encoder
    grid = tuple(emb.shape[-2:])
    native = tuple(pe.image_embedding_size) == grid
    image_pe = pe.get_dense_pe() if native else pe.pe_layer(grid).unsqueeze(0)
    patch = pe.input_image_size[0] // pe.image_embedding_size[0]
    input_size = tuple(patch * g for g in grid)
    outs = []
    for kind, value in prompts.items():
        kw = _kind_kwargs(kind, value)
        sparse, dense = (pe(masks=None, **kw) if native else
                         encode_prompts(pe, kw["points"], kw["boxes"], None, input_size, grid))
        logits, _ = sam.mask_decoder(image_embeddings=emb[None], image_pe=image_pe,
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
        outs.append(logits)
    return torch.cat(outs).float()


class TeacherTargets:
    """The teachers' outputs for training batches: cached when the cache has them, else live.

    ``sam``: a ``segment_anything.Sam``; ``clip``: a ``CLIPTeacher``; ``cache``: a
    ``fastsamclip.train.teacher_cache.TeacherCache`` checked against them, or None; ``autocast``: a
    zero-argument callable giving the precision context of the live teachers.
    """

    def __init__(self, sam, clip, cache, autocast: Callable, sam_size: Optional[int] = None):
        self.sam, self.clip, self.cache, self._autocast = sam, clip, cache, autocast
        self.misses = 0  # batches the cache could not serve (0 for a complete cache)
        self.sam_encoder = sam.image_encoder
        if sam_size is not None and sam_size != sam.image_encoder.img_size:
            # The teacher's weights in an encoder that follows another input size (see above).
            name = infer_sam_type(sam.state_dict())
            if name is None:
                raise ConfigError("the SAM teacher's config is not one of fastsamclip's, so it cannot run at "
                                  f"--sam-image-size {sam_size}; use its native size {sam.image_encoder.img_size}")
            self.sam_encoder = build_backbone(get_sam_config(name).backbone)
            self.sam_encoder.load_state_dict(sam.image_encoder.state_dict())
            self.sam_encoder.to(next(sam.parameters()).device).eval().requires_grad_(False)

    @torch.no_grad()
    def live_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, E) CLIP teacher embeddings of uint8 views (B, 3, r, r), the teacher normalising them."""
        with self._autocast():
            return self.clip.encode_image(self.clip.preprocess(pixels)).float()

    @torch.no_grad()
    def live_sam(self, pixels: torch.Tensor, valid_hw) -> torch.Tensor:
        """(B, C, g, g) SAM teacher image embeddings of padded uint8 inputs (B, 3, L, L)."""
        with self._autocast():
            return self.sam_encoder(sam_preprocess(self.sam, pixels, valid_hw)).float()

    def clip_embeddings(self, keys: List[str], pixels: torch.Tensor, resolution: int) -> torch.Tensor:
        if self.cache is not None:
            t = self.cache.clip_batch(keys, resolution)
            if t is not None:
                return t.to(pixels.device)
            self.misses += 1
        return self.live_clip(pixels)

    def sam_embeddings(self, keys: List[str], pixels: torch.Tensor, valid_hw) -> torch.Tensor:
        if self.cache is not None:
            t = self.cache.sam_batch(keys)
            if t is not None:
                return t.to(pixels.device)
            self.misses += 1
        return self.live_sam(pixels, valid_hw)

    def masks(self, emb: torch.Tensor, prompts: dict) -> torch.Tensor:
        return teacher_masks(self.sam, emb, prompts)
