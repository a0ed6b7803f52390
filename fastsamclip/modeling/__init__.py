"""Models: SAM's image encoder (backbone) and the merged SAM-CLIP model."""

from .backbone import BACKBONE_CONFIGS, BackboneConfig, ImageEncoderViT, build_backbone

_SAMCLIP_NAMES = ("SAMCLIP", "CLIPHead", "CLIPHeadConfig", "SAMCLIPConfig", "encode_prompts")


def __getattr__(name):
    # samclip imports fastsamclip.teachers, which imports the backbone from this package:
    # importing it lazily keeps `import fastsamclip.teachers` free of an import cycle.
    if name in _SAMCLIP_NAMES:
        from . import samclip

        return getattr(samclip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKBONE_CONFIGS", "BackboneConfig", "ImageEncoderViT", "build_backbone", *_SAMCLIP_NAMES]
