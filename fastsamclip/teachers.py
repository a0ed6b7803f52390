"""The two frozen teachers, loaded through their own libraries from their official formats.

- SAM: ``segment_anything`` modules, from an official ``.pth`` state dict (``sam_vit_b_01ec64.pth``
  and friends), configs ``vit_b`` / ``vit_l`` / ``vit_h`` (and small ones for tests).
- CLIP: ``open_clip``, any model name with ``pretrained`` as a tag (``datacomp_xl_s13b_b90k``) or a
  local checkpoint file, or a ``local-dir:`` / ``hf-hub:`` model folder; with its tokenizer and
  text tower.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from fastsamclip.modeling.backbone import BACKBONE_CONFIGS, BackboneConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # on 0-255 pixels, as segment_anything
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mask_in_chans: int = 16  # hidden channels of the mask-prompt downscaler
    decoder_depth: int = 2  # two-way transformer depth
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def prompt_embed_dim(self) -> int:
        return self.backbone.out_chans

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamConfig":
        d = dict(d)
        d["backbone"] = BackboneConfig.from_dict(d["backbone"])
        return cls(**d)


SAM_CONFIGS: Dict[str, SamConfig] = {
    "vit_b": SamConfig(backbone=BACKBONE_CONFIGS["vit_b"]),
    "vit_l": SamConfig(backbone=BACKBONE_CONFIGS["vit_l"]),
    "vit_h": SamConfig(backbone=BACKBONE_CONFIGS["vit_h"]),
    "vit_tiny": SamConfig(backbone=BACKBONE_CONFIGS["vit_tiny"], mask_in_chans=8, decoder_mlp_dim=64,
                          decoder_heads=2, iou_head_hidden_dim=32),
    "vit_micro": SamConfig(backbone=BACKBONE_CONFIGS["vit_micro"], mask_in_chans=4, decoder_depth=1,
                           decoder_mlp_dim=32, decoder_heads=2, iou_head_hidden_dim=16),
}


def get_sam_config(name_or_config: Union[str, SamConfig]) -> SamConfig:
    if isinstance(name_or_config, SamConfig):
        return name_or_config
    if name_or_config not in SAM_CONFIGS:
        raise ValueError(f"unknown SAM model type {name_or_config!r}; known: {', '.join(SAM_CONFIGS)}")
    return SAM_CONFIGS[name_or_config]


def build_prompt_encoder(cfg: SamConfig):
    from segment_anything.modeling import PromptEncoder

    grid = cfg.backbone.img_size // cfg.backbone.patch_size
    return PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(grid, grid),
                         input_image_size=(cfg.backbone.img_size, cfg.backbone.img_size),
                         mask_in_chans=cfg.mask_in_chans)


def build_mask_decoder(cfg: SamConfig):
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    return MaskDecoder(
        num_multimask_outputs=cfg.num_multimask_outputs,
        transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                      mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )


def build_sam(config: Union[str, SamConfig] = "vit_b"):
    """``segment_anything.modeling.Sam`` for a config; for ``vit_b/l/h`` this is exactly what
    ``segment_anything.sam_model_registry[...]`` builds."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, Sam

    cfg = get_sam_config(config)
    b = cfg.backbone
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=b.depth, embed_dim=b.embed_dim, img_size=b.img_size, mlp_ratio=b.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=b.norm_eps), num_heads=b.num_heads,
            patch_size=b.patch_size, qkv_bias=b.qkv_bias, use_rel_pos=b.use_rel_pos,
            global_attn_indexes=b.global_attn_indexes, window_size=b.window_size,
            out_chans=b.out_chans,
        ),
        prompt_encoder=build_prompt_encoder(cfg),
        mask_decoder=build_mask_decoder(cfg),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


class CheckpointError(ValueError):
    """A checkpoint file that is not what the caller asked for; the message says what to do."""


def _read_state_dict(path: str, what: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # training checkpoints that wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (got {type(sd).__name__})")
    return sd


def infer_sam_type(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The SAM config whose shapes match a state dict (by width and depth), or None."""
    pe = state_dict.get("image_encoder.pos_embed")
    if pe is None:
        return None
    depth = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")), default=-1)
    for name, cfg in SAM_CONFIGS.items():
        b = cfg.backbone
        if pe.shape[-1] == b.embed_dim and depth == b.depth and pe.shape[1] == b.img_size // b.patch_size:
            return name
    return None


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str, path: str = "") -> None:
    """Raise a ``CheckpointError`` listing missing keys, unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if not (missing or extra or wrong):
        return

    def listing(keys: List[str]) -> str:
        shown = ", ".join(keys[:12])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

    parts = [f"{what} checkpoint {path} does not match the model:"]
    if missing:
        parts.append(f"  missing keys: {listing(missing)}")
    if extra:
        parts.append(f"  unexpected keys: {listing(extra)}")
    if wrong:
        parts.append("  shape mismatches: " + listing(
            [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]))
    raise CheckpointError("\n".join(parts))


def load_sam_teacher(checkpoint: Optional[str], model_type: Union[str, SamConfig] = "vit_b"):
    """The frozen SAM teacher from an official ``.pth`` file (``None``: random weights).

    Errors name the problem: a file that is not a SAM checkpoint, one of another size (with the
    size it is), missing or extra keys.
    """
    sam = build_sam(model_type)
    if checkpoint is not None:
        sd = _read_state_dict(checkpoint, "SAM")
        if not any(k.startswith("image_encoder.") for k in sd):
            raise CheckpointError(
                f"{checkpoint} is not a SAM checkpoint: it has no 'image_encoder.*' weights "
                f"(first keys: {', '.join(list(sd)[:5])}). Official files are sam_vit_b_01ec64.pth, "
                "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth."
            )
        actual = infer_sam_type(sd)
        wanted = model_type if isinstance(model_type, str) else None
        if actual is not None and wanted is not None and actual != wanted:
            raise CheckpointError(
                f"{checkpoint} is a SAM {actual} checkpoint but model type {wanted!r} was asked for; "
                f"pass --sam-type {actual} (or model_type='{actual}')"
            )
        check_state_dict(sam, sd, "SAM", checkpoint)
        sam.load_state_dict(sd)
    for p in sam.parameters():
        p.requires_grad_(False)
    return sam.eval()


# --------------------------------------------------------------------------------------------
# CLIP teacher
# --------------------------------------------------------------------------------------------
class CLIPTeacher(nn.Module):
    """An open_clip model with its tokenizer and preprocessing constants.

    ``encode_image`` takes images normalised with ``image_mean``/``image_std`` at
    ``image_size``; ``encode_text`` takes token ids from ``tokenize``.
    """

    def __init__(self, model: nn.Module, tokenizer, model_name: str, model_cfg: dict):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_cfg = model_cfg
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.image_mean = tuple(pp.get("mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(pp.get("std", OPENAI_CLIP_STD))
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.embed_dim = int(model_cfg["embed_dim"])

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)


def clip_model_config(model_name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}: not a built-in name (open_clip.list_models()), "
            "nor a 'local-dir:' folder with open_clip_config.json; register a JSON config with "
            "open_clip.add_model_config(path) for custom models"
        )
    return cfg


def load_clip_teacher(model_name: str, pretrained: Optional[str] = None, device: Union[str, torch.device] = "cpu"):
    """The frozen CLIP teacher through ``open_clip.create_model``.

    ``pretrained``: an open_clip tag (``datacomp_xl_s13b_b90k``; needs the weights in the hub
    cache, since no download is attempted offline), a local checkpoint file, or None for random
    weights. ``model_name`` may be ``local-dir:/folder`` (open_clip_config.json + weights).
    """
    import open_clip

    cfg = clip_model_config(model_name)
    if pretrained is not None and not os.path.isfile(pretrained) and os.path.sep in pretrained:
        raise FileNotFoundError(f"CLIP pretrained file not found: {pretrained}")
    model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                   require_pretrained=pretrained is not None)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return CLIPTeacher(model, tokenizer, model_name, cfg)


def build_text_tower(model_cfg: dict) -> nn.Module:
    """An open_clip model from its config with the image tower removed (the student replaces it).

    The image tower is built at the smallest size first, since it is dropped right away: that
    keeps loading a ViT-L/14 text encoder from a merged checkpoint cheap. The remaining state
    dict keys are exactly the teacher's non-``visual.*`` keys.
    """
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in model_cfg.items()}
    text_cfg = cfg["text_cfg"]
    custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa-style CLIP teachers (multimodal_cfg) are not supported as text towers")
    cfg["vision_cfg"] = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 64}
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    model.visual = None
    return model


def text_state_dict(clip_model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in clip_model.state_dict().items() if not k.startswith("visual.")}


def tokenizer_for(model_name: str, model_cfg: dict):
    """open_clip's tokenizer for a model; a custom config falls back to its text settings."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except Exception:
        text_cfg = model_cfg.get("text_cfg", {})
        if "hf_tokenizer_name" in text_cfg:
            return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                  context_length=text_cfg.get("context_length", 77))
        return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


__all__ = [
    "CLIPTeacher", "CheckpointError", "SAM_CONFIGS", "SamConfig", "build_sam", "build_text_tower",
    "check_state_dict", "get_sam_config", "infer_sam_type", "load_clip_teacher", "load_sam_teacher",
]
