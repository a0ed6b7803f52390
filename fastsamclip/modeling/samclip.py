"""The merged SAM-CLIP model: one ViT backbone, a SAM head and a CLIP head.

    pixels (B, 3, H, W) uint8 / 0..255
      -> preprocess                              SAM-normalised, padding zeroed
      -> image_encoder.forward_features          trunk tokens (B, h, w, C)
           -> image_encoder.forward_neck         SAM image embeddings (B, 256, h, w)
                -> prompt_encoder + mask_decoder  masks for point / box / mask prompts
           -> clip_head                          pooled CLIP embedding (B, E), per-patch (B, h, w, E)
    text tokens -> text (the CLIP teacher's frozen text tower) -> (B, E)

open_clip's interface on the same model, for tools written against open_clip models
(``clip_benchmark``, retrieval indexes...): ``image_transform(r)`` is the ``preprocess`` that
``open_clip.create_model_and_transforms`` would return (an image -> a (3, r, r) tensor),
``encode_image(images, normalize=False)`` the pooled CLIP embedding of such tensors,
``encode_text(tokens, normalize=False)`` with ``tokenizer``, and ``logit_scale`` the text tower's
learned log temperature (``logit_scale.exp()`` is the scale, as on an open_clip model).

The modules are built by ``fastsamclip.modeling.build`` (``build_samclip``,
``samclip_from_teachers``); this file holds what they compute. Parameter names of the SAM part
equal ``segment_anything.Sam``'s (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

Choices where the paper is silent (written down here so they are visible):
- The per-patch embedding applies the same LayerNorm + MLP to every patch token (the paper's
  "projection applied per patch" for zero-shot semantic segmentation).
- Every stream feeds the backbone SAM-normalised pixels (SAM's mean/std on 0-255), whatever the
  resolution; only the CLIP teacher sees CLIP's normalisation (each model normalises its own input).
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsamclip.transforms import (
    MASK_THRESHOLD,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    ImageLike,
    clip_pixels,
    normalize,
    to_rgb_uint8,
)


def pool_tokens(features: torch.Tensor, k: int) -> torch.Tensor:
    """(B, h, w, C) trunk tokens -> (B, ceil(h/k), ceil(w/k), C), each the mean of its k x k cell
    (a cell cut by the border averages the tokens it has); identity for k = 1.

    The ViT-B CLIP head at 1024 px is three global-attention blocks over 4096 tokens: 0.331 TFLOP,
    twice CLIP ViT-L/14 at 224 px (0.162); on 32 x 32 pooled tokens (k = 2) it costs 0.054, on
    16 x 16 (k = 4) 0.012, beside the backbone's 0.972 (counted by ``bench/e2e.py``)."""
    if k == 1:
        return features
    if k < 1:
        raise ValueError(f"token_pool must be a positive integer, got {k}")
    x = F.avg_pool2d(features.permute(0, 3, 1, 2), kernel_size=k, stride=k, ceil_mode=True)
    return x.permute(0, 2, 3, 1)


class CLIPHead(nn.Module):
    """Blocks -> pool over patches -> LayerNorm -> MLP (two hidden layers) -> E.

    ``block``: the backbone's last block, copied ``num_blocks`` times (the paper initialises
    every head block from it; ``init_from_block`` copies its weights again later)."""

    def __init__(self, block: nn.Module, num_blocks: int, embed_dim: int, hidden_dim: int, out_dim: int,
                 pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"CLIP head pool must be 'max' or 'avg', got {pool!r}")
        self.blocks = nn.ModuleList(copy.deepcopy(block) for _ in range(num_blocks))
        self.pool = pool
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def init_from_block(self, block: nn.Module) -> None:
        for blk in self.blocks:
            blk.load_state_dict(block.state_dict())

    @property
    def projection(self) -> nn.Linear:
        """The final Linear: ``pooled = projection(pooled_features(tokens))``."""
        return self.mlp[-1]

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            features = blk(features)
        return features

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) head tokens -> (B, hidden): everything before the final projection, so a
        loss can fuse the projection with the cosine (``linear_cosine_distill_loss``)."""
        flat = tokens.flatten(1, 2)
        x = flat.amax(dim=1) if self.pool == "max" else flat.mean(dim=1)
        return self.mlp[:-1](self.norm(x))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) head tokens -> (B, E)."""
        return self.projection(self.pooled_features(tokens))

    def per_patch(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) head tokens -> (B, h, w, E)."""
        return self.mlp(self.norm(tokens))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.tokens(features))


def encode_prompts(prompt_encoder: nn.Module, points: Optional[Tuple[torch.Tensor, torch.Tensor]],
                   boxes: Optional[torch.Tensor], masks: Optional[torch.Tensor],
                   input_size: Tuple[int, int], grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``PromptEncoder.forward`` at any input size and embedding grid.

    Upstream fixes both at construction (1024 px, 64 x 64); this is the same arithmetic with the
    sizes passed in, and without in-place masked writes (so it compiles).
    points: (coords (P, n, 2) in input pixels, labels (P, n)); boxes (P, 4) XYXY; masks (P, 1,
    4*gh, 4*gw) low-res logits. Returns sparse (P, k, D) and dense (P, D, gh, gw) embeddings.
    """
    pe = prompt_encoder
    bs = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else (
        masks.shape[0] if masks is not None else 1)
    weight = pe.point_embeddings[0].weight
    sparse = torch.empty((bs, 0, pe.embed_dim), device=weight.device, dtype=weight.dtype)
    if points is not None:
        coords, labels = points
        coords = coords + 0.5
        if boxes is None:
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = pe.pe_layer.forward_with_coords(coords, input_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, pe.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + (lab == 0) * pe.point_embeddings[0].weight + (lab == 1) * pe.point_embeddings[1].weight
        sparse = torch.cat([sparse, emb.to(sparse.dtype)], dim=1)
    if boxes is not None:
        corners = pe.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 2), input_size)
        corners = torch.stack([corners[:, 0] + pe.point_embeddings[2].weight[0],
                               corners[:, 1] + pe.point_embeddings[3].weight[0]], dim=1)
        sparse = torch.cat([sparse, corners.to(sparse.dtype)], dim=1)
    if masks is not None:
        dense = pe.mask_downscaling(masks)
    else:
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, grid[0], grid[1])
    return sparse, dense


class CLIPImageTransform:
    """An image -> (3, r, r) float32 input of ``SAMCLIP.encode_image``: CLIP's eval geometry
    (shortest side resized to r, bicubic, centre crop: ``transforms.clip_pixels``) normalised with
    the model's own statistics (SAM's, on 0..255), what ``SAMCLIPPredictor.classify`` and
    ``fastsamclip eval`` feed the CLIP head. Takes what ``transforms.to_rgb_uint8`` takes (PIL
    image, uint8 array, path); a plain object, so DataLoader workers can pickle it."""

    def __init__(self, resolution: int, mean=SAM_PIXEL_MEAN, std=SAM_PIXEL_STD) -> None:
        self.resolution = int(resolution)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: ImageLike) -> torch.Tensor:
        return normalize(clip_pixels(to_rgb_uint8(image), self.resolution), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"CLIPImageTransform(resolution={self.resolution}: resize shortest side (bicubic), centre crop, "
                f"(x - {self.mean}) / {self.std} on 0..255)")


class SAMCLIP(nn.Module):
    """The merged model (built by ``fastsamclip.modeling.build``)."""

    # segment_anything.Sam's constants, read by code written for Sam (SamPredictor, the mask generator).
    mask_threshold: float = MASK_THRESHOLD
    image_format: str = "RGB"

    def __init__(self, config, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 clip_head: CLIPHead, text: Optional[nn.Module] = None,
                 tokenizer_factory: Optional[Callable[[], Callable]] = None) -> None:
        super().__init__()
        self.config = config  # a fastsamclip.modeling.build.SAMCLIPConfig (what a checkpoint stores)
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.clip_head = clip_head
        self.text = text
        self._tokenizer = None
        self._tokenizer_factory = tokenizer_factory
        # SAM's statistics (0..255 units). Plain numbers, not buffers: a bf16 copy of the model
        # must not round them (123.675 is 124 in bf16).
        self.pixel_mean, self.pixel_std = SAM_PIXEL_MEAN, SAM_PIXEL_STD
        self.freeze_text()

    def freeze_text(self) -> None:
        if self.text is not None:
            self.text.eval()
            for p in self.text.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "SAMCLIP":
        super().train(mode)
        if self.text is not None:
            self.text.eval()  # frozen: never in training mode
        return self

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_factory is None:
                raise RuntimeError("this model has no text tower (it was built without a CLIP teacher)")
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    # ---------------------------------------------------------------- image side
    def preprocess(self, pixels: torch.Tensor, valid_hw=None) -> torch.Tensor:
        """uint8 / 0..255 pixels (B, 3, H, W) -> SAM-normalised float32, zero outside ``valid_hw``
        (the (h, w) of each image inside a padded input), as ``segment_anything.Sam.preprocess``."""
        device = self.image_encoder.patch_embed.proj.weight.device
        return normalize(pixels.to(device), self.pixel_mean, self.pixel_std, valid_hw)

    def image_transform(self, resolution: int = 224) -> CLIPImageTransform:
        """open_clip's ``preprocess`` for this model: an image -> the (3, r, r) tensor
        ``encode_image`` takes (see :class:`CLIPImageTransform`); r a multiple of the patch size."""
        patch = int(self.config.sam.backbone.patch_size)
        if int(resolution) <= 0 or int(resolution) % patch:
            raise ValueError(f"resolution {resolution} must be a positive multiple of the patch size {patch}")
        return CLIPImageTransform(resolution, self.pixel_mean, self.pixel_std)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's ``encode_image``: (B, 3, r, r) from ``image_transform(r)`` -> (B, E) pooled
        CLIP embeddings (unit length with ``normalize``), in the image side's dtype; equals
        ``forward(images, clip=True, sam=False)["clip"]``."""
        weight = self.image_encoder.patch_embed.proj.weight
        return self.clip_embeddings(self.forward_features(images.to(weight.device, weight.dtype)), normalize=normalize)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.forward_features(images)

    def sam_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.forward_neck(features)

    def clip_embeddings(self, features: torch.Tensor, patches: bool = False, normalize: bool = False,
                        token_pool: int = 1):
        """Pooled (B, E), or with ``patches=True`` a pair (pooled (B, E), per-patch (B, h', w', E)).

        ``token_pool`` k > 1: the CLIP head runs on the trunk tokens averaged over k x k cells
        (:func:`pool_tokens`; h' = ceil(h / k)) instead of all of them, the per-patch map on that
        grid. k = 1 is the paper's path."""
        tokens = self.clip_head.tokens(pool_tokens(features, token_pool))
        pooled = self.clip_head.pooled(tokens)
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        if not patches:
            return pooled
        per_patch = self.clip_head.per_patch(tokens)
        return pooled, (F.normalize(per_patch, dim=-1) if normalize else per_patch)

    def forward(self, images: torch.Tensor, clip: bool = True, sam: bool = True,
                clip_patches: bool = False, clip_token_pool: int = 1) -> Dict[str, torch.Tensor]:
        """One backbone pass for both heads. images: (B, 3, H, W) SAM-normalised (``preprocess``),
        sides multiples of 16. Returns a dict with ``clip`` (B, E), ``clip_patches`` (B, h, w, E),
        ``sam`` (B, 256, h, w), as asked. ``clip_token_pool`` k > 1: the CLIP head takes the trunk
        tokens pooled k x k (see ``clip_embeddings``), its per-patch map at that grid."""
        features = self.forward_features(images)
        out: Dict[str, torch.Tensor] = {}
        if clip or clip_patches:
            pooled, per_patch = (self.clip_embeddings(features, patches=True, token_pool=clip_token_pool)
                                 if clip_patches else (self.clip_embeddings(features, token_pool=clip_token_pool), None))
            if clip:
                out["clip"] = pooled
            if clip_patches:
                out["clip_patches"] = per_patch
        if sam:
            out["sam"] = self.sam_embeddings(features)
        return out

    # ---------------------------------------------------------------- SAM head
    def predict_masks(self, sam_embeddings: torch.Tensor, input_size: Optional[Tuple[int, int]] = None,
                      points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      boxes: Optional[torch.Tensor] = None, masks: Optional[torch.Tensor] = None,
                      multimask_output: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Masks for the prompts of ONE image.

        sam_embeddings: (1, 256, gh, gw) or (256, gh, gw); input_size: the padded input (H, W)
        in pixels (default 16 * grid); points (coords (P, n, 2) XY in input pixels, labels
        (P, n) 1 fg / 0 bg); boxes (P, 4) XYXY in input pixels; masks (P, 1, 4gh, 4gw) logits.
        Returns low-res logits (P, K, 4gh, 4gw) and IoU predictions (P, K), K = 3 with
        multimask_output else 1 (as ``segment_anything``).
        """
        emb = sam_embeddings if sam_embeddings.dim() == 4 else sam_embeddings[None]
        if emb.shape[0] != 1:
            raise ValueError(f"predict_masks takes the embeddings of one image, got batch {emb.shape[0]}")
        if points is None and boxes is None and masks is None:
            raise ValueError("predict_masks: give at least one prompt (points, boxes or masks)")
        grid = (emb.shape[-2], emb.shape[-1])
        input_size = input_size or (grid[0] * 16, grid[1] * 16)
        sparse, dense = encode_prompts(self.prompt_encoder, points, boxes, masks, input_size, grid)
        image_pe = self.prompt_encoder.pe_layer(grid).unsqueeze(0)
        return self.mask_decoder(image_embeddings=emb, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=multimask_output)

    # ---------------------------------------------------------------- text side
    @property
    def logit_scale(self) -> torch.Tensor:
        """The text tower's learned log temperature (open_clip's ``logit_scale``: ``.exp()`` is the scale)."""
        if self.text is None:
            raise RuntimeError("this model has no text tower (it was built without a CLIP teacher)")
        return self.text.logit_scale

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's ``encode_text``: token ids from ``tokenizer`` (B, context) -> (B, E)."""
        if self.text is None:
            raise RuntimeError("this model has no text tower (it was built without a CLIP teacher)")
        return self.text.encode_text(tokens, normalize=normalize)

    def trainable_parameters(self) -> Dict[str, list]:
        """Parameter groups of the recipe: CLIP head, backbone, SAM head (text is frozen)."""
        return {
            "clip_head": [p for p in self.clip_head.parameters()],
            "backbone": [p for p in self.image_encoder.parameters()],
            "sam_head": [p for p in self.mask_decoder.parameters()],
        }

    def num_parameters(self, part: Optional[str] = None) -> int:
        mod = self if part is None else getattr(self, part)
        return sum(p.numel() for p in mod.parameters()) if mod is not None else 0
