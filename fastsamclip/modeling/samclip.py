"""The merged SAM-CLIP model: one ViT backbone, a SAM head and a CLIP head.

    images (B, 3, H, W), SAM-normalised
      -> image_encoder.forward_features          trunk tokens (B, h, w, C)
           -> image_encoder.forward_neck         SAM image embeddings (B, 256, h, w)
                -> prompt_encoder + mask_decoder  masks for point / box / mask prompts
           -> clip_head                          pooled CLIP embedding (B, E), per-patch (B, h, w, E)
    text tokens -> text (the CLIP teacher's frozen text tower) -> (B, E)

Choices where the paper is silent (written down here so they are visible):
- CLIP head MLP: two hidden layers of the backbone's width with GELU (ViT-B: 768 -> 768 -> 768
  -> E). With three transformer blocks this adds ~24% parameters to ViT-B, the paper's "~25%".
- The per-patch embedding applies the same LayerNorm + MLP to every patch token (the paper's
  "projection applied per patch" for zero-shot semantic segmentation).
- Every stream feeds the backbone SAM-normalised pixels (SAM's mean/std on 0-255), whatever the
  resolution; only the CLIP teacher sees CLIP's normalisation.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsamclip.modeling.backbone import Block, ImageEncoderViT
from fastsamclip.teachers import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SamConfig,
    build_mask_decoder,
    build_prompt_encoder,
    build_text_tower,
    get_sam_config,
    infer_sam_type,
    text_state_dict,
    tokenizer_for,
)


@dataclass(frozen=True)
class CLIPHeadConfig:
    num_blocks: int = 3  # transformer blocks, each initialised from the backbone's last block
    hidden_dim: Optional[int] = None  # MLP hidden width (both layers); None: the backbone width
    out_dim: int = 768  # the CLIP teacher's embedding size (ViT-L/14: 768, ViT-B/16: 512)
    pool: str = "max"  # patch-token pooling: "max" (paper: beats "avg") or "avg"


@dataclass(frozen=True)
class SAMCLIPConfig:
    sam: SamConfig = field(default_factory=SamConfig)  # backbone + SAM head
    clip_head: CLIPHeadConfig = field(default_factory=CLIPHeadConfig)
    text_model_name: str = ""  # open_clip model name of the teacher (for its tokenizer)
    text_model_cfg: Optional[dict] = None  # open_clip model config; None: no text tower

    def to_dict(self) -> dict:
        return {"sam": self.sam.to_dict(), "clip_head": asdict(self.clip_head),
                "text_model_name": self.text_model_name, "text_model_cfg": self.text_model_cfg}

    @classmethod
    def from_dict(cls, d: dict) -> "SAMCLIPConfig":
        return cls(sam=SamConfig.from_dict(d["sam"]), clip_head=CLIPHeadConfig(**d["clip_head"]),
                   text_model_name=d.get("text_model_name", ""), text_model_cfg=d.get("text_model_cfg"))


class CLIPHead(nn.Module):
    """Blocks -> pool over patches -> LayerNorm -> MLP (two hidden layers) -> E."""

    def __init__(self, backbone: ImageEncoderViT, cfg: CLIPHeadConfig) -> None:
        super().__init__()
        b = backbone.config
        last = backbone.blocks[-1]
        grid = b.img_size // b.patch_size
        self.blocks = nn.ModuleList(
            Block(b.embed_dim, b.num_heads, b.mlp_ratio, b.qkv_bias, b.use_rel_pos,
                  window_size=last.window_size, input_size=(grid, grid), norm_eps=b.norm_eps)
            for _ in range(cfg.num_blocks)
        )
        if cfg.pool not in ("max", "avg"):
            raise ValueError(f"CLIP head pool must be 'max' or 'avg', got {cfg.pool!r}")
        self.pool = cfg.pool
        hidden = cfg.hidden_dim or b.embed_dim
        self.norm = nn.LayerNorm(b.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(b.embed_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, cfg.out_dim),
        )

    def init_from_backbone(self, backbone: ImageEncoderViT) -> None:
        for blk in self.blocks:
            blk.load_state_dict(backbone.blocks[-1].state_dict())

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            features = blk(features)
        return features

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) head tokens -> (B, E)."""
        flat = tokens.flatten(1, 2)
        x = flat.amax(dim=1) if self.pool == "max" else flat.mean(dim=1)
        return self.mlp(self.norm(x))

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


class SAMCLIP(nn.Module):
    """The merged model. Parameter names of the SAM part equal ``segment_anything.Sam``'s
    (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)."""

    def __init__(self, config: SAMCLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT(config.sam.backbone)
        self.prompt_encoder = build_prompt_encoder(config.sam)
        self.mask_decoder = build_mask_decoder(config.sam)
        self.clip_head = CLIPHead(self.image_encoder, config.clip_head)
        self.text = build_text_tower(config.text_model_cfg) if config.text_model_cfg else None
        self._tokenizer = None
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)
        self.freeze_text()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_teachers(cls, sam, clip_teacher=None, clip_head: Optional[CLIPHeadConfig] = None,
                      sam_config=None) -> "SAMCLIP":
        """The student as the paper initialises it: backbone and SAM head copied from the SAM
        teacher, CLIP head blocks from the backbone's last block, the text tower copied from the
        CLIP teacher (frozen). ``sam`` is a ``segment_anything.Sam``; its config is recognised
        from its shapes unless ``sam_config`` (a name or ``SamConfig``) is given."""
        if sam_config is None:
            sam_config = infer_sam_type(sam.state_dict())
            if sam_config is None:
                raise ValueError("could not recognise the SAM teacher's config from its shapes; pass sam_config")
        sam_cfg = get_sam_config(sam_config)
        head = clip_head or CLIPHeadConfig(out_dim=clip_teacher.embed_dim if clip_teacher else 768)
        if clip_teacher is not None and head.out_dim != clip_teacher.embed_dim:
            raise ValueError(
                f"CLIP head out_dim {head.out_dim} differs from the CLIP teacher's embedding size "
                f"{clip_teacher.embed_dim}; the student must predict the teacher's embedding"
            )
        cfg = SAMCLIPConfig(
            sam=sam_cfg, clip_head=head,
            text_model_name=clip_teacher.model_name if clip_teacher else "",
            text_model_cfg=copy.deepcopy(clip_teacher.model_cfg) if clip_teacher else None,
        )
        model = cls(cfg)
        model.image_encoder.load_state_dict(sam.image_encoder.state_dict())
        model.prompt_encoder.load_state_dict(sam.prompt_encoder.state_dict())
        model.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
        model.clip_head.init_from_backbone(model.image_encoder)
        if clip_teacher is not None:
            model.text.load_state_dict(text_state_dict(clip_teacher.model))
            model._tokenizer = clip_teacher.tokenizer
        return model

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
            if self.config.text_model_cfg is None:
                raise RuntimeError("this model has no text tower (it was built without a CLIP teacher)")
            self._tokenizer = tokenizer_for(self.config.text_model_name, self.config.text_model_cfg)
        return self._tokenizer

    # ---------------------------------------------------------------- image side
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """0-255 pixels (B, 3, H, W) -> SAM-normalised floats."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.forward_features(images)

    def sam_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.forward_neck(features)

    def clip_embeddings(self, features: torch.Tensor, patches: bool = False, normalize: bool = False):
        """Pooled (B, E), or with ``patches=True`` a pair (pooled (B, E), per-patch (B, h, w, E))."""
        tokens = self.clip_head.tokens(features)
        pooled = self.clip_head.pooled(tokens)
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        if not patches:
            return pooled
        per_patch = self.clip_head.per_patch(tokens)
        return pooled, (F.normalize(per_patch, dim=-1) if normalize else per_patch)

    def forward(self, images: torch.Tensor, clip: bool = True, sam: bool = True,
                clip_patches: bool = False) -> Dict[str, torch.Tensor]:
        """One backbone pass for both heads. images: (B, 3, H, W) SAM-normalised, sides
        multiples of 16. Returns a dict with ``clip`` (B, E), ``clip_patches`` (B, h, w, E),
        ``sam`` (B, 256, h, w), as asked."""
        features = self.forward_features(images)
        out: Dict[str, torch.Tensor] = {}
        if clip or clip_patches:
            pooled, per_patch = self.clip_embeddings(features, patches=True) if clip_patches else (
                self.clip_embeddings(features), None)
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
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
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
