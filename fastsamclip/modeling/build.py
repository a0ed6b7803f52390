"""Configurations as data and the builders of every model (as ``segment_anything/build_sam.py``
and open_clip's factory): the one registry of sizes, the one place that wires modules together.

- ``BACKBONE_CONFIGS`` / ``SAM_CONFIGS``: SAM's three image encoders and decoders (``vit_b``,
  ``vit_l``, ``vit_h``, exactly ``segment_anything.sam_model_registry``'s) plus two small configs
  with the same structure for tests and the CPU demo.
- ``CLIPHeadConfig`` / ``SAMCLIPConfig``: the merged model; ``SAMCLIPConfig.to_dict`` is what the
  merged checkpoint stores, so its field names are a file format.
- Builders: ``build_backbone``, ``build_sam`` (upstream's ``Sam``), ``build_prompt_encoder``,
  ``build_mask_decoder``, ``build_text_tower`` (open_clip without its image tower),
  ``build_samclip`` (a config -> the merged model) and ``samclip_from_teachers`` (the paper's
  initialisation).

Choices where the paper is silent (written down here so they are visible):
- CLIP head MLP: two hidden layers of the backbone's width with GELU (ViT-B: 768 -> 768 -> 768
  -> E). With three transformer blocks this adds ~24% parameters to ViT-B, the paper's "~25%".
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import open_clip
import torch
import torch.nn as nn
from open_clip.model import CLIP, CustomTextCLIP
from segment_anything.modeling import ImageEncoderViT as SamImageEncoderViT
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from fastsamclip.errors import ConfigError
from fastsamclip.modeling.backbone import ImageEncoderViT
from fastsamclip.modeling.samclip import SAMCLIP, CLIPHead
from fastsamclip.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class BackboneConfig:
    img_size: int = 1024  # the resolution the weights were trained at (sets table sizes)
    patch_size: int = 16  # pixels per patch side
    in_chans: int = 3
    embed_dim: int = 768  # transformer width
    depth: int = 12  # number of blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256  # neck output channels (SAM's prompt embedding dim)
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14  # window side (tokens) of the non-global blocks
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)  # blocks that attend over the whole grid
    norm_eps: float = 1e-6  # LayerNorm eps (SAM: 1e-6)

    @property
    def grid(self) -> int:
        """Tokens per side at the native size (64 for SAM at 1024 px)."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        d = dict(d)
        d["global_attn_indexes"] = tuple(d.get("global_attn_indexes", ()))
        return cls(**d)


BACKBONE_CONFIGS: Dict[str, BackboneConfig] = {
    # SAM's three image encoders (segment_anything/build_sam.py).
    "vit_b": BackboneConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": BackboneConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": BackboneConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Small configs with the same structure (windowed + global blocks, padding, rel-pos), for
    # tests and the CPU demo. Windows of 4 tokens on a 128px (8 x 8) grid; 6 tokens leave a
    # padded remainder on the same grid, the case SAM's 64 x 64 grid with 14-token windows has.
    "vit_tiny": BackboneConfig(img_size=128, embed_dim=64, depth=4, num_heads=2, window_size=6,
                               global_attn_indexes=(1, 3), out_chans=32),
    "vit_micro": BackboneConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3,
                                global_attn_indexes=(1,), out_chans=16),
    # The SAM of the miniature world (fastsamclip.miniature), trained from scratch on two CPU
    # cores: 128 px canvases on an 8 x 8 grid, two windowed and two global blocks, a wider
    # neck than vit_tiny's so the decoder's upscaled mask features have 8 channels, not 4.
    "vit_mini": BackboneConfig(img_size=128, embed_dim=96, depth=4, num_heads=3, window_size=4,
                               global_attn_indexes=(1, 3), out_chans=64),
}


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
    "vit_mini": SamConfig(backbone=BACKBONE_CONFIGS["vit_mini"], mask_in_chans=8, decoder_mlp_dim=256,
                          decoder_heads=4, iou_head_hidden_dim=64),
}


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


def _lookup(registry: dict, name_or_config, what: str):
    if not isinstance(name_or_config, str):
        return name_or_config
    if name_or_config not in registry:
        raise ConfigError(f"unknown {what} {name_or_config!r}; known: {', '.join(registry)}")
    return registry[name_or_config]


def get_backbone_config(name_or_config: Union[str, BackboneConfig]) -> BackboneConfig:
    return _lookup(BACKBONE_CONFIGS, name_or_config, "backbone config")


def get_sam_config(name_or_config: Union[str, SamConfig]) -> SamConfig:
    return _lookup(SAM_CONFIGS, name_or_config, "SAM model type")


# ------------------------------------------------------------------------------------ SAM parts
def _encoder_kwargs(b: BackboneConfig) -> dict:
    """The image-encoder arguments of a config, as upstream's ``_build_sam`` passes them."""
    return dict(depth=b.depth, embed_dim=b.embed_dim, img_size=b.img_size, mlp_ratio=b.mlp_ratio,
                norm_layer=functools.partial(nn.LayerNorm, eps=b.norm_eps), num_heads=b.num_heads,
                patch_size=b.patch_size, qkv_bias=b.qkv_bias, use_abs_pos=b.use_abs_pos,
                use_rel_pos=b.use_rel_pos, global_attn_indexes=b.global_attn_indexes,
                window_size=b.window_size, out_chans=b.out_chans, in_chans=b.in_chans)


def build_backbone(name_or_config: Union[str, BackboneConfig] = "vit_b") -> ImageEncoderViT:
    """``build_backbone("vit_b")``: SAM ViT-B's image encoder (this package's), randomly initialised."""
    return ImageEncoderViT(**_encoder_kwargs(get_backbone_config(name_or_config)))


def build_prompt_encoder(cfg: SamConfig) -> PromptEncoder:
    b = cfg.backbone
    return PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(b.grid, b.grid),
                         input_image_size=(b.img_size, b.img_size), mask_in_chans=cfg.mask_in_chans)


def build_mask_decoder(cfg: SamConfig) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=cfg.num_multimask_outputs,
        transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                      mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )


def build_sam(config: Union[str, SamConfig] = "vit_b") -> Sam:
    """``segment_anything.modeling.Sam`` for a config, in eval mode; for ``vit_b/l/h`` this is
    exactly what ``segment_anything.sam_model_registry[...]`` builds."""
    cfg = get_sam_config(config)
    sam = Sam(image_encoder=SamImageEncoderViT(**_encoder_kwargs(cfg.backbone)),
              prompt_encoder=build_prompt_encoder(cfg), mask_decoder=build_mask_decoder(cfg),
              pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))
    return sam.eval()


# ------------------------------------------------------------------------------------ text tower
def build_text_tower(model_cfg: dict) -> nn.Module:
    """An open_clip model from its config with the image tower removed (the student replaces it).

    The image tower is built at the smallest size first, since it is dropped right away: that
    keeps loading a ViT-L/14 text encoder from a merged checkpoint cheap. The remaining state
    dict keys are exactly the teacher's non-``visual.*`` keys.
    """
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
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception:
        text_cfg = model_cfg.get("text_cfg", {})
        if "hf_tokenizer_name" in text_cfg:
            return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                  context_length=text_cfg.get("context_length", 77))
        return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


# ------------------------------------------------------------------------------------ the merged model
def build_samclip(config: SAMCLIPConfig) -> SAMCLIP:
    """The merged model of a config, randomly initialised (a checkpoint's weights go on top)."""
    cfg = config.sam
    encoder = ImageEncoderViT(**_encoder_kwargs(cfg.backbone))
    head = config.clip_head
    clip_head = CLIPHead(encoder.blocks[-1], head.num_blocks, cfg.backbone.embed_dim,
                         head.hidden_dim or cfg.backbone.embed_dim, head.out_dim, head.pool)
    text = build_text_tower(config.text_model_cfg) if config.text_model_cfg else None
    tokenizer: Optional[Callable] = None
    if config.text_model_cfg:
        # Loading the vocabulary costs a second: only when a caller tokenizes.
        tokenizer = functools.partial(tokenizer_for, config.text_model_name, config.text_model_cfg)
    return SAMCLIP(config, encoder, build_prompt_encoder(cfg), build_mask_decoder(cfg), clip_head, text,
                   tokenizer_factory=tokenizer)


def samclip_from_teachers(sam: Sam, clip_teacher=None, clip_head: Optional[CLIPHeadConfig] = None,
                          sam_config: Union[str, SamConfig, None] = None) -> SAMCLIP:
    """The student as the paper initialises it: backbone and SAM head copied from the SAM
    teacher, CLIP head blocks from the backbone's last block, the text tower copied from the
    CLIP teacher (frozen). ``sam`` is a ``segment_anything.Sam``; its config is recognised from
    its shapes unless ``sam_config`` (a name or ``SamConfig``) is given. ``clip_teacher``: a
    ``fastsamclip.modeling.teachers.CLIPTeacher`` (or None: no text tower)."""
    if sam_config is None:
        sam_config = infer_sam_type(sam.state_dict())
        if sam_config is None:
            raise ConfigError("could not recognise the SAM teacher's config from its shapes; pass sam_config")
    sam_cfg = get_sam_config(sam_config)
    head = clip_head or CLIPHeadConfig(out_dim=clip_teacher.embed_dim if clip_teacher else 768)
    if clip_teacher is not None and head.out_dim != clip_teacher.embed_dim:
        raise ConfigError(
            f"CLIP head out_dim {head.out_dim} differs from the CLIP teacher's embedding size "
            f"{clip_teacher.embed_dim}; the student must predict the teacher's embedding")
    cfg = SAMCLIPConfig(
        sam=sam_cfg, clip_head=head,
        text_model_name=clip_teacher.model_name if clip_teacher else "",
        text_model_cfg=copy.deepcopy(clip_teacher.model_cfg) if clip_teacher else None,
    )
    model = build_samclip(cfg)
    model.image_encoder.load_state_dict(sam.image_encoder.state_dict())
    model.prompt_encoder.load_state_dict(sam.prompt_encoder.state_dict())
    model.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
    model.clip_head.init_from_block(model.image_encoder.blocks[-1])
    if clip_teacher is not None:
        model.text.load_state_dict(text_state_dict(clip_teacher.model))
        model.set_tokenizer(clip_teacher.tokenizer)
    return model


def infer_sam_type(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The SAM config whose shapes match a state dict (by width, depth and grid), or None."""
    pe = state_dict.get("image_encoder.pos_embed")
    if pe is None:
        return None
    depth = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")), default=-1)
    for name, cfg in SAM_CONFIGS.items():
        b = cfg.backbone
        if pe.shape[-1] == b.embed_dim and depth == b.depth and pe.shape[1] == b.grid:
            return name
    return None
