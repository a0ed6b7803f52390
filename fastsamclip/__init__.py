"""fastsamclip: SAM-CLIP, one ViT backbone for promptable masks and image-text semantics."""

__version__ = "0.1.0"
