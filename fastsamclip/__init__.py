"""fastsamclip: SAM-CLIP, one ViT backbone for promptable masks and image-text semantics.

Layers, each importing only from those below it: ``fastsamclip.kernels`` (ops),
``fastsamclip.modeling`` + ``fastsamclip.transforms`` + ``fastsamclip.checkpoint`` (the model and
its geometry), then the application (``data``, ``train``, ``predictor``, ``eval``, ``cli``).
"""

__version__ = "0.1.0"
