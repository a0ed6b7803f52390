"""The models: SAM's image encoder (backbone), the merged SAM-CLIP model, the two teachers.

``build`` holds the configurations and the builders; ``teachers`` loads SAM and CLIP from their
official formats.
"""

from .backbone import ImageEncoderViT
from .build import (
    BACKBONE_CONFIGS,
    SAM_CONFIGS,
    BackboneConfig,
    CLIPHeadConfig,
    SAMCLIPConfig,
    SamConfig,
    build_backbone,
    build_sam,
    build_samclip,
    get_sam_config,
    infer_sam_type,
    samclip_from_teachers,
)
from .samclip import SAMCLIP, CLIPHead, CLIPImageTransform, encode_prompts, pool_tokens
from .teachers import (
    CheckpointError,
    CLIPTeacher,
    load_clip_teacher,
    load_sam_teacher,
    sam_preprocess,
)

__all__ = [
    "BACKBONE_CONFIGS", "SAM_CONFIGS", "BackboneConfig", "CLIPHead", "CLIPHeadConfig", "CLIPImageTransform",
    "CLIPTeacher", "CheckpointError", "ImageEncoderViT", "SAMCLIP", "SAMCLIPConfig", "SamConfig", "build_backbone", "build_sam",
    "build_samclip", "encode_prompts", "get_sam_config", "infer_sam_type", "load_clip_teacher", "load_sam_teacher",
    "pool_tokens", "sam_preprocess", "samclip_from_teachers",
]
