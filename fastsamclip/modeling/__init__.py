from .backbone import BACKBONE_CONFIGS, BackboneConfig, ImageEncoderViT, build_backbone
from .samclip import SAMCLIP, CLIPHead, CLIPHeadConfig, SAMCLIPConfig, encode_prompts

__all__ = ["BACKBONE_CONFIGS", "BackboneConfig", "CLIPHead", "CLIPHeadConfig", "ImageEncoderViT",
           "SAMCLIP", "SAMCLIPConfig", "build_backbone", "encode_prompts"]
