"""Inference with a merged checkpoint: :class:`SAMCLIPPredictor` (one backbone pass per image serves
promptable masks, every mask with its name, zero-shot labels and semantic maps)."""

from fastsamclip.predictor.everything import OUTPUT_MODES, EverythingParams
from fastsamclip.predictor.predictor import SAMCLIPPredictor
from fastsamclip.predictor.semantic import SemanticResult
from fastsamclip.transforms import ImageReadError, to_rgb_uint8

__all__ = ["EverythingParams", "ImageReadError", "OUTPUT_MODES", "SAMCLIPPredictor", "SemanticResult", "to_rgb_uint8"]
