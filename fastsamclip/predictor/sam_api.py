"""``segment_anything.SamPredictor``'s interface on :class:`SAMCLIPPredictor`, so that code written
for SAM runs on the merged model with only its constructor changed::

    predictor = SAMCLIPPredictor("merged.safetensors")     # was: SamPredictor(sam)
    predictor.set_image(image)                             # (H, W, 3) uint8, image_format "RGB" | "BGR"
    masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    masks, _, _ = predictor.predict(point_coords=..., point_labels=...,
                                    mask_input=logits[np.argmax(scores), :, :][None, :, :], multimask_output=False)
    boxes = predictor.transform.apply_boxes_torch(torch.tensor([[75, 275, 1725, 850]]), image.shape[:2])
    masks, _, _ = predictor.predict_torch(point_coords=None, point_labels=None, boxes=boxes, multimask_output=False)

Every name, shape, dtype and return value is SamPredictor's: ``predict`` takes one prompt in
original image pixels (``point_coords`` (N, 2), ``point_labels`` (N,), ``box`` (4,) or (1, 4),
``mask_input`` (1, 4gh, 4gw)) and returns numpy ``masks`` (C, H, W) (bool, or float logits with
``return_logits``), ``scores`` (C,) and low-res ``logits`` (C, 4gh, 4gw) (256 x 256 at 1024 px),
C = 3 with ``multimask_output`` else 1; ``predict_torch`` takes B prompts already mapped by
``transform`` into the model's input frame and returns torch tensors with a leading B axis;
``get_image_embedding`` the (1, 256, gh, gw) SAM embedding; ``transform`` is segment_anything's own
``ResizeLongestSide`` at the model's native size. ``predict`` is ``segment`` with one prompt (the
batched ``segment`` keeps its leading prompt axis for many prompts at once), so both give the same
masks and check their input the same way.

Where SamPredictor asserts, this interface is a superset: ``point_labels`` may be left out (every
point foreground, as ``segment``), and ``set_image`` also takes a PIL image or a path (decoded as
RGB). A call without any prompt is refused with one line saying what to give, where SamPredictor
would run the decoder on no prompt at all.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from fastsamclip.errors import InputError
from fastsamclip.transforms import MASK_THRESHOLD, postprocess_masks

IMAGE_FORMATS = ("RGB", "BGR")


def check_image_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format must be 'RGB' or 'BGR' (the channel order of the array), got {image_format!r}")


class SamPredictorInterface:
    """The methods of ``SamPredictor`` that ``SAMCLIPPredictor`` adds to its own (see the module
    docstring). Relies on the predictor's ``model``, ``device``, ``img_size``, ``features``,
    ``original_size``, ``input_size``, ``forward``, ``set_pass``, ``segment`` and ``decode``."""

    @functools.cached_property
    def transform(self) -> ResizeLongestSide:
        """segment_anything's ``ResizeLongestSide`` at the model's native size, as ``SamPredictor.transform``."""
        return ResizeLongestSide(self.img_size)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, int]) -> None:
        """``SamPredictor.set_torch_image``: ``transformed_image`` (1, 3, h, w), 0..255, already
        resized by ``transform.apply_image`` (longest side the native size), not padded;
        ``original_image_size`` the (H, W) before resizing. One backbone pass, as ``set_image``."""
        t = transformed_image
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3 or (
                max(t.shape[2:]) != self.img_size):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"set_torch_image takes a (1, 3, h, w) tensor whose longest side is {self.img_size} "
                             f"(predictor.transform.apply_image's output), got {shape}")
        h, w = int(t.shape[2]), int(t.shape[3])
        padded = F.pad(t.to(torch.float32), (0, self.img_size - w, 0, self.img_size - h))
        out = self.forward(self.model.preprocess(padded, (h, w)), clip=True, sam=True, clip_patches=True)
        self.set_pass(out, tuple(int(s) for s in original_image_size), (h, w))

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's SAM embedding (1, C, gh, gw), as ``SamPredictor.get_image_embedding``."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``SamPredictor.predict``: one prompt in original image pixels -> numpy (masks (C, H, W),
        scores (C,), low-res logits (C, 4gh, 4gw)). ``segment`` with P = 1, its prompt axis dropped."""
        if point_coords is None and box is None and mask_input is None:
            raise InputError("predict: give at least one prompt (point_coords with point_labels, box or mask_input)")
        masks, scores, low_res = self.segment(points=point_coords, point_labels=point_labels, boxes=box,
                                              mask_input=mask_input, multimask_output=multimask_output,
                                              return_logits=return_logits)
        if masks.shape[0] != 1:
            raise InputError(f"predict takes one prompt (point_coords (N, 2), box (4,) or (1, 4), mask_input "
                             f"(1, h, w)); got {masks.shape[0]}: use predict_torch or segment for a batch")
        return masks[0], scores[0], low_res[0]

    @torch.no_grad()
    def predict_torch(self, point_coords: Optional[torch.Tensor], point_labels: Optional[torch.Tensor],
                      boxes: Optional[torch.Tensor] = None, mask_input: Optional[torch.Tensor] = None,
                      multimask_output: bool = True, return_logits: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch``: B prompts already in the model's input frame
        (``transform.apply_coords_torch`` / ``apply_boxes_torch``): ``point_coords`` (B, N, 2),
        ``point_labels`` (B, N), ``boxes`` (B, 4), ``mask_input`` (B, 1, 4gh, 4gw). Returns torch
        (masks (B, C, H, W) bool or logits, IoU predictions (B, C), low-res logits (B, C, 4gh, 4gw))."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is None and boxes is None and mask_input is None:
            raise InputError("predict_torch: give at least one prompt (point_coords with point_labels, boxes or "
                             "mask_input)")
        if point_coords is not None and point_labels is None:
            raise InputError("predict_torch: point_labels (B, N) must be given with point_coords (B, N, 2)")
        sizes = {}
        low = tuple(4 * s for s in self.features.shape[-2:])
        for name, t, tail in (("point_coords", point_coords, (None, 2)), ("point_labels", point_labels, (None,)),
                              ("boxes", boxes, (4,)), ("mask_input", mask_input, (1, *low))):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 + len(tail) or any(
                    want is not None and got != want for got, want in zip(t.shape[1:], tail)):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                want = "(B, " + ", ".join("N" if w is None else str(w) for w in tail) + ")"
                raise InputError(f"predict_torch: {name} must be a {want} tensor, got {shape}")
            sizes[name] = int(t.shape[0])
        if point_coords is not None and tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise InputError(f"predict_torch: point_labels {tuple(point_labels.shape)} does not match point_coords "
                             f"{tuple(point_coords.shape)}")
        if len(set(sizes.values())) > 1:
            raise InputError(f"predict_torch: prompt batch sizes differ: {sizes}")
        low_res, iou = self.decode(point_coords, point_labels, boxes, mask_input, multimask_output)
        masks = postprocess_masks(low_res, self.input_size, self.original_size, self.img_size,
                                  threshold=None if return_logits else MASK_THRESHOLD)
        return masks, iou, low_res
