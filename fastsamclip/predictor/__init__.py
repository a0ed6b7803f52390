"""Inference with a merged checkpoint: :class:`SAMCLIPPredictor` (one backbone pass per image serves
promptable masks, zero-shot labels and semantic maps)."""

from fastsamclip.predictor.predictor import SAMCLIPPredictor
from fastsamclip.predictor.semantic import SemanticResult
from fastsamclip.transforms import ImageReadError, to_rgb_uint8

__all__ = ["ImageReadError", "SAMCLIPPredictor", "SemanticResult", "to_rgb_uint8"]
