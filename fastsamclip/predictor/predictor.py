"""Inference with the merged SAM-CLIP model: promptable masks, zero-shot labels, semantic maps.

    predictor = SAMCLIPPredictor("merged.safetensors")
    predictor.set_image(image)                        # ONE backbone pass at the native size
    masks, scores, low_res = predictor.segment(points=[[[x, y]]], point_labels=[[1]])
    probs = predictor.classify([image], ["cat", "dog"])
    result = predictor.semantic_segment(image, ["cat", "dog", "grass"], mode="composed")
    records = predictor.generate(image, labels=["cat", "dog", "grass"])  # every mask, named
    found = predictor.segment_text(image, ["a cat", "a dog"])  # every instance of each phrase

The predictor is also a ``segment_anything.SamPredictor`` (``predict``, ``predict_torch``,
``get_image_embedding``, ``transform``, ``set_torch_image``: :mod:`fastsamclip.predictor.sam_api`),
so SAM code runs on it with only the constructor changed; ``segment`` is ``predict`` for P prompts
at once. Prompts are in ORIGINAL image pixels, mapped with
SAM's ResizeLongestSide rule to the model's native input size, and masks come back at the
original size (low-res logits upscaled to the padded input, cropped, resized). At
initialisation the merged model's SAM side is the SAM teacher, so ``segment`` equals
``SamPredictor(sam).predict`` on the same image and prompts (tested). Every image argument goes
through ``fastsamclip.transforms.to_rgb_uint8`` (its rule is in that module's docstring).

Resolutions: ``set_image``, ``embed_images`` and the "composed" semantic mode use the SAM
geometry (resize the longest side, pad bottom/right) at the model's native size, so every pixel
is covered; ``classify`` uses CLIP's geometry (resize the shortest side, centre crop) at
``resolution`` (default 224, the CLIP teacher's usual size); the "clip" semantic mode uses the
SAM geometry at ``resolution`` (default 448, the paper's setting). The backbone always sees
SAM-normalised pixels (``SAMCLIP.preprocess``), as in training.

The forward pass runs eagerly, or compiled per input shape (``compile=True``, see
:mod:`fastsamclip.predictor.engine`); ``warmup(resolutions, batch_sizes)`` compiles ahead of the
first request. ``gpu_preprocess=True`` resizes and normalises on the GPU with the CUDA kernel
(``fastsamclip.kernels.preprocess``; bilinear without antialias, so downscaled inputs differ
slightly from the PIL path used otherwise).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from fastsamclip.checkpoint import load_merged
from fastsamclip.errors import InputError, check_range
from fastsamclip.kernels import preprocess as gpu_preprocess_op
from fastsamclip.modeling import SAMCLIP
from fastsamclip.predictor.concepts import ConceptParams, check_texts
from fastsamclip.predictor.concepts import segment_text as segment_concepts
from fastsamclip.predictor.engine import Forward, check_device, check_finite_outputs
from fastsamclip.predictor.prompts import check_boxes, check_inside, check_point_labels
from fastsamclip.predictor.everything import EverythingParams
from fastsamclip.predictor.everything import generate as generate_everything
from fastsamclip.predictor.sam_api import SamPredictorInterface, check_image_format
from fastsamclip.predictor.semantic import SemanticResult, segment_clip, segment_composed
from fastsamclip.predictor.text import TextEmbeddings, check_labels
from fastsamclip.transforms import (
    MASK_THRESHOLD,
    ImageLike,
    apply_boxes,
    apply_coords,
    clip_pixels,
    get_preprocess_shape,
    postprocess_masks,
    sam_pixels,
    to_rgb_uint8,
)


class ImageNotSetError(InputError, RuntimeError):
    """A call that needs the current image before ``set_image``: a RuntimeError as
    ``SamPredictor``'s, and an input error (one line from the commands)."""


class SAMCLIPPredictor(SamPredictorInterface):
    """Promptable segmentation, zero-shot classification and semantic segmentation with one model,
    and ``segment_anything.SamPredictor``'s interface (``predict``, ``predict_torch``,
    ``get_image_embedding``, ``transform``...: :mod:`fastsamclip.predictor.sam_api`).

    model_or_checkpoint_path: a ``SAMCLIP`` or the path of a merged ``.safetensors`` checkpoint
    (anything else raises ``CheckpointError`` from ``load_merged``, naming the command that makes
    one). device: default CUDA when available, else CPU. compile: wrap the model's forward with
    ``torch.compile(fullgraph=True, dynamic=False)``, one compiled function per input shape;
    compile_backend picks the torch.compile backend (default inductor), compile_mode its mode
    (default "reduce-overhead" on CUDA), cache_dir a persistent Inductor cache. dtype: the
    precision of the image side (backbone, neck, CLIP head; cast in place): "auto" is, for a
    checkpoint path, bf16 on CUDA and on a CPU with native bf16 (``kernels.native_bf16``), else
    fp32, and for a model object the dtype it has (a model the caller holds is never cast
    unasked); or "fp32" / "bf16" / "fp16"; outputs are fp32 either way, and the
    prompt encoder, mask decoder and text tower stay fp32 (see ``engine``). clip_token_pool: k > 1
    runs the CLIP head on the backbone's tokens pooled k x k (trained in stage 3; at 1024 px, k = 2
    cuts the whole pass by a fifth of its FLOPs), 1 (default) on all of them as the paper does.
    """

    def __init__(self, model_or_checkpoint_path: Union[SAMCLIP, str, "os.PathLike"], device=None,
                 compile: bool = False, compile_backend: str = "inductor", compile_mode: Optional[str] = None,
                 cache_dir: Optional[str] = None, gpu_preprocess: bool = False, dtype="auto",
                 clip_token_pool: int = 1) -> None:
        device = check_device(device)
        if gpu_preprocess and device.type != "cuda":
            raise ValueError("gpu_preprocess=True needs a CUDA device; the CPU path is used otherwise")
        if isinstance(model_or_checkpoint_path, SAMCLIP):
            model = model_or_checkpoint_path.to(device).eval()
            if isinstance(dtype, str) and dtype == "auto":
                dtype = model.image_encoder.patch_embed.proj.weight.dtype
        else:
            model = load_merged(os.fspath(model_or_checkpoint_path), device)
        self.model = model
        self.device = device
        self.img_size = int(model.config.sam.backbone.img_size)
        self.patch_size = int(model.config.sam.backbone.patch_size)
        self.forward = Forward(model, device, compile, compile_backend, compile_mode, cache_dir, dtype, clip_token_pool)
        self.dtype = self.forward.dtype
        self.text = TextEmbeddings(model, device)
        self.gpu_preprocess = gpu_preprocess
        self.reset_image()

    @property
    def _compiled(self) -> dict:
        """The compiled functions so far, one per (input shape, outputs)."""
        return self.forward._compiled

    @torch.no_grad()
    def warmup(self, resolutions: Optional[Sequence[int]] = None, batch_sizes: Sequence[int] = (1,),
               outputs: Sequence[str] = ("set_image",)) -> Dict[str, float]:
        """Run (and, with ``compile=True``, compile) every (resolution, batch) ahead of requests.

        resolutions: input sides (default: the native size); outputs: "set_image" (both heads
        and per-patch CLIP, what ``set_image`` runs), "embed" (``embed_images``: pooled CLIP and
        SAM), "clip" (``classify``: pooled CLIP only). Returns seconds per case; the first
        call of a case includes its compile, so these are the cold start costs.
        """
        return self.forward.warmup(resolutions or (self.img_size,), batch_sizes, outputs, self.patch_size)

    # ---------------------------------------------------------------- image state
    def reset_image(self) -> None:
        """Forget the current image (as ``SamPredictor.reset_image``)."""
        self.is_image_set = False
        self.image: Optional[np.ndarray] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None
        self.features: Optional[torch.Tensor] = None  # (1, C, gh, gw) SAM image embeddings
        self.clip_embedding: Optional[torch.Tensor] = None  # (1, E) pooled, not normalised
        self.clip_patches: Optional[torch.Tensor] = None  # (1, gh, gw, E) per patch, not normalised

    def _sam_input(self, rgb: np.ndarray, side: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(1, 3, side, side) SAM-normalised input on the device and the resized (h, w)."""
        if self.gpu_preprocess:
            img = torch.from_numpy(rgb).to(self.device, non_blocking=True)
            hw = get_preprocess_shape(*rgb.shape[:2], side)
            # The same launch writes a CLIP crop too; none is needed here, so ask for the
            # smallest one (a patch) rather than a second code path.
            x, _ = gpu_preprocess_op(img, sam_side=side, sam_hw=hw, sam_mean=self.model.pixel_mean,
                                     sam_std=self.model.pixel_std, clip_side=self.patch_size,
                                     clip_mean=(0.0, 0.0, 0.0), clip_std=(1.0, 1.0, 1.0))
            return x[None], hw
        x, hw = sam_pixels(rgb, side)
        return self.model.preprocess(x[None].to(self.device), hw), hw

    @torch.no_grad()
    def set_image(self, image: ImageLike, image_format: str = "RGB") -> None:
        """One backbone pass at the native size; caches both heads' outputs for the image.

        image: uint8 (H, W, 3) array, PIL image or path (other formats: see to_rgb_uint8);
        image_format: the array's channel order, "RGB" or "BGR" (as ``SamPredictor.set_image``;
        a PIL image or a file is decoded as RGB).
        Afterwards ``original_size`` = (H, W), ``input_size`` = the resized (h, w) before padding,
        ``features`` (1, C, gh, gw), ``clip_embedding`` (1, E), ``clip_patches`` (1, gh, gw, E).
        """
        check_image_format(image_format)
        rgb = to_rgb_uint8(image)
        if image_format == "BGR":
            if isinstance(image, (str, os.PathLike)) or type(image).__module__.startswith("PIL"):
                raise InputError("image_format='BGR' describes an array's channels; a file or a PIL image is "
                                 "decoded as RGB: leave image_format out")
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        x, input_size = self._sam_input(rgb, self.img_size)
        out = self.forward(x, clip=True, sam=True, clip_patches=True)
        self.set_pass(out, rgb.shape[:2], input_size, image=rgb)

    def set_pass(self, out: Dict[str, torch.Tensor], original_size: Tuple[int, int], input_size: Tuple[int, int],
                 image: Optional[np.ndarray] = None) -> None:
        """The current image from a backbone pass made elsewhere (``forward``'s ``sam``, ``clip``
        and ``clip_patches`` of one image, e.g. a row of a batched pass): what ``set_image``
        stores after its own pass. ``image``: the RGB array, needed by crop layers of ``generate``."""
        self.reset_image()
        self.image = image
        self.original_size = tuple(original_size)
        self.input_size = tuple(input_size)
        self.features = out["sam"]
        self.clip_embedding = out["clip"]
        self.clip_patches = out["clip_patches"]
        self.is_image_set = True

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("no image is set: call set_image(image) first, or pass the image")

    def _check_side(self, name: str, value) -> int:
        """An input side: a positive multiple of the patch size (what the backbone can take)."""
        check_range(name, value, self.patch_size, integer=True)
        if int(value) % self.patch_size:
            raise InputError(f"{name} {value}: must be a multiple of the patch size {self.patch_size}")
        return int(value)

    # ---------------------------------------------------------------- promptable masks
    @torch.no_grad()
    def segment(self, points=None, point_labels=None, boxes=None, mask_input=None,
                multimask_output: bool = True, return_logits: bool = False):
        """Masks for P prompts at once, in ORIGINAL image pixels (``SamPredictor.predict`` batched).

        points: (P, N, 2) XY (or (N, 2) for one prompt); point_labels: (P, N) 1 foreground,
        0 background, -1 padding (ignored); default all 1. boxes: (P, 4) XYXY (or (4,)).
        mask_input: (P, 1, 4gh, 4gw) low-res logits from an earlier call (or (1, 4gh, 4gw)).
        Returns numpy (masks (P, K, H, W) bool, or float logits with return_logits; scores (P, K);
        low-res logits (P, K, 4gh, 4gw)), K = 3 with multimask_output else 1.
        """
        self._require_image()
        if points is None and boxes is None and mask_input is None:
            raise InputError("segment: give at least one prompt (points, boxes or mask_input)")
        coords = labels = box_t = mask_t = None
        sizes = {}
        if points is not None:
            pts = np.asarray(points.cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
            pts = pts[None] if pts.ndim == 2 else pts
            if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[1] == 0:
                raise InputError(f"points must be (P, N, 2) or (N, 2) XY, got shape {pts.shape}")
            if point_labels is None:
                lab = np.ones(pts.shape[:2], dtype=np.int64)
            else:
                lab = np.asarray(point_labels.cpu() if isinstance(point_labels, torch.Tensor) else point_labels)
                lab = lab.reshape(pts.shape[:2]) if lab.size == pts.shape[0] * pts.shape[1] else lab
                if lab.shape != pts.shape[:2]:
                    raise InputError(f"point_labels shape {lab.shape} does not match points {pts.shape[:2]}")
                check_point_labels(lab)
            check_inside("point", pts, self.original_size, lab != -1)
            # Float64 mapping then float32, exactly as SamPredictor.predict does.
            coords = torch.as_tensor(apply_coords(pts, self.original_size, self.img_size), dtype=torch.float)
            labels = torch.as_tensor(lab, dtype=torch.int)
            sizes["points"] = pts.shape[0]
        if boxes is not None:
            bx = np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
            bx = bx[None] if bx.ndim == 1 else bx
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise InputError(f"boxes must be (P, 4) or (4,) XYXY, got shape {bx.shape}")
            check_boxes(bx, self.original_size)
            box_t = torch.as_tensor(apply_boxes(bx, self.original_size, self.img_size), dtype=torch.float)
            sizes["boxes"] = bx.shape[0]
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input.cpu() if isinstance(mask_input, torch.Tensor)
                                                else mask_input), dtype=torch.float)
            mask_t = mask_t[None] if mask_t.dim() == 3 else mask_t
            low = tuple(4 * s for s in self.features.shape[-2:])
            if mask_t.dim() != 4 or mask_t.shape[1] != 1 or tuple(mask_t.shape[-2:]) != low:
                raise InputError(f"mask_input must be (P, 1, {low[0]}, {low[1]}) low-res logits, got {tuple(mask_t.shape)}")
            if not bool(torch.isfinite(mask_t).all()):
                raise InputError("mask_input holds NaN or Infinity: give finite low-res logits (as segment returns)")
            sizes["mask_input"] = mask_t.shape[0]
        if len(set(sizes.values())) > 1:
            raise InputError(f"prompt batch sizes differ: {sizes}; give the same number P of each kind")
        low_res, scores = self.decode(coords, labels, box_t, mask_t, multimask_output)
        masks = postprocess_masks(low_res, self.input_size, self.original_size, self.img_size,
                                  threshold=None if return_logits else MASK_THRESHOLD)
        return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

    def decode(self, coords, labels, boxes, masks, multimask_output: bool):
        """Prompts already in the (padded) input frame -> (low-res logits (P, K, 4gh, 4gw), scores (P, K))."""
        dev = self.device
        pts = (coords.to(dev), labels.to(dev)) if coords is not None else None
        with torch.no_grad():
            low_res, scores = self.model.predict_masks(
                self.features, (self.img_size, self.img_size), points=pts,
                boxes=boxes.to(dev) if boxes is not None else None,
                masks=masks.to(dev) if masks is not None else None, multimask_output=multimask_output)
        check_finite_outputs("mask decoder", {"masks": low_res, "scores": scores})
        return low_res, scores

    # ---------------------------------------------------------------- segment everything
    @torch.no_grad()
    def generate(self, image: Optional[ImageLike] = None, labels: Optional[Sequence[str]] = None,
                 label_threshold: float = 0.0, templates="openai", **params) -> List[dict]:
        """Every mask of the image (``SamAutomaticMaskGenerator.generate``), each named with ``labels``.

        image: as ``set_image``; None: the current image, whose cached pass then serves the
        full-image crop (the current image state is never changed). params: the generator's
        (``points_per_side=32``, ``points_per_batch=64``, ``pred_iou_thresh=0.88``,
        ``stability_score_thresh=0.95``, ``stability_score_offset=1.0``, ``box_nms_thresh=0.7``,
        ``crop_n_layers=0``, ``crop_nms_thresh=0.7``, ``crop_overlap_ratio=512/1500``,
        ``crop_n_points_downscale_factor=1``, ``point_grids=None``, ``min_mask_region_area=0``,
        ``output_mode="binary_mask"`` | ``"uncompressed_rle"`` | ``"coco_rle"``), see
        :class:`~fastsamclip.predictor.everything.EverythingParams`. Returns upstream's records
        (``segmentation``, ``area``, ``bbox`` XYWH, ``predicted_iou``, ``point_coords``,
        ``stability_score``, ``crop_box`` XYWH); with ``labels`` also ``label`` (None when its
        probability is below ``label_threshold``), ``label_score``, ``label_probs`` and
        ``label_similarity``, from the same backbone pass (pooling: :mod:`fastsamclip.predictor.everything`).
        """
        cfg = EverythingParams.from_kwargs(params)
        if image is None:
            self._require_image()
        return generate_everything(self, None if image is None else to_rgb_uint8(image), cfg, labels,
                                   label_threshold, templates)

    # ---------------------------------------------------------------- segment by text
    @torch.no_grad()
    def segment_text(self, image: Optional[ImageLike], phrases: Union[str, Sequence[str]], **params) -> List[dict]:
        """Every instance of each phrase ("a cat", "a red car"), from one backbone pass.

        image: as ``set_image``, which runs it (it becomes the current image, so further prompts
        reuse the pass); None: the current image. phrases: one string or a list of at most 256;
        several phrases share the pass and the decoder batches, and their text embeddings are
        cached across calls. params (defaults): ``threshold=0.5``, ``score_threshold=0.5``,
        ``nms_thresh=0.5``, ``max_peaks=32``, ``box_prompts=True``, ``points_per_batch=64``,
        ``background=("background",)``, ``templates="openai"``, ``output_mode="binary_mask"``
        (or "uncompressed_rle", "coco_rle"): see :class:`~fastsamclip.predictor.concepts.ConceptParams`
        and the method in :mod:`fastsamclip.predictor.concepts`. Returns one record per instance:
        ``phrase``, ``segmentation``, ``area``, ``bbox`` (XYWH), ``score``, ``predicted_iou``,
        ``phrase_score``, ``similarity``, ``prompt``; by phrase as given, then by score; none for a
        phrase absent from the image. Bad phrases or parameters raise one ValueError.
        """
        phrases = check_texts(phrases)
        cfg = ConceptParams.from_kwargs(params)
        if image is not None:
            self.set_image(image)
        self._require_image()
        return segment_concepts(self, phrases, cfg)

    # ---------------------------------------------------------------- text side
    def logit_scale(self) -> float:
        """The CLIP teacher's temperature (its learned ``logit_scale``, at most 100)."""
        return self.text.logit_scale()

    def text_embeddings(self, labels: Sequence[str], templates="openai") -> torch.Tensor:
        """(L, E) unit class embeddings (the CLIP zero-shot recipe), cached per label tuple."""
        return self.text(labels, templates)

    # ---------------------------------------------------------------- batches
    def _as_list(self, images) -> List[np.ndarray]:
        if isinstance(images, (str, os.PathLike)) or (hasattr(images, "ndim") and images.ndim in (2, 3)) or (
                type(images).__module__.startswith("PIL")):
            images = [images]
        out = [to_rgb_uint8(im) for im in images]
        if not out:
            raise ValueError("no images given")
        return out

    @torch.no_grad()
    def embed_images(self, images, resolution: Optional[int] = None, batch_size: int = 8) -> Dict[str, torch.Tensor]:
        """Both heads for a batch, in the SAM geometry at ``resolution`` (default native size).

        Returns ``sam`` (B, C, g, g), ``clip`` (B, E) and ``clip_patches`` (B, g, g, E) (not
        normalised), and ``input_sizes`` (B, 2) the resized (h, w) of each image before padding.
        """
        res = self._check_side("resolution", self.img_size if resolution is None else resolution)
        check_range("batch_size", batch_size, 1, integer=True)
        prepped = [sam_pixels(im, res) for im in self._as_list(images)]
        outs = []
        for i in range(0, len(prepped), batch_size):
            chunk = prepped[i:i + batch_size]
            x = self.model.preprocess(torch.stack([p[0] for p in chunk]).to(self.device), [p[1] for p in chunk])
            outs.append(self.forward(x, clip=True, sam=True, clip_patches=True))
        result = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        result["input_sizes"] = torch.tensor([p[1] for p in prepped])
        return result

    @torch.no_grad()
    def classify(self, images, labels: Sequence[str], resolution: int = 224, templates="openai",
                 batch_size: int = 32) -> np.ndarray:
        """Zero-shot probabilities (B, L): softmax over classes of scale * cos(image, class).

        images: one image or a list; each is resized (shortest side) and centre-cropped to
        ``resolution`` (CLIP's eval geometry, SAM-normalised, what the CLIP stream was trained on)
        and run in batches of ``batch_size``.
        """
        resolution = self._check_side("resolution", resolution)
        check_range("batch_size", batch_size, 1, integer=True)
        text = self.text_embeddings(labels, templates)
        rgbs = self._as_list(images)
        pooled = []
        for i in range(0, len(rgbs), batch_size):
            x = torch.stack([clip_pixels(im, resolution) for im in rgbs[i:i + batch_size]]).to(self.device)
            pooled.append(self.forward(self.model.preprocess(x), clip=True, sam=False)["clip"].float())
        img = F.normalize(torch.cat(pooled), dim=-1)
        return (self.logit_scale() * img @ text.T).softmax(-1).cpu().numpy()

    # ---------------------------------------------------------------- semantic segmentation
    @torch.no_grad()
    def semantic_segment(self, image: Optional[ImageLike], labels: Sequence[str], mode: str = "clip",
                         resolution: int = 448, threshold: float = 0.5, points_per_class: int = 3,
                         templates="openai") -> SemanticResult:
        """Zero-shot semantic segmentation of one image into ``labels`` (see ``SemanticResult``).

        mode "clip": the CLIP head at ``resolution`` (``threshold`` and ``points_per_class`` unused);
        mode "composed": ``set_image(image)`` (one native pass; ``image=None`` reuses the current
        one), then the CLIP head's class maps prompt the SAM head. The rules of both are in
        :mod:`fastsamclip.predictor.semantic`.
        """
        labels = check_labels(labels)
        if mode not in ("clip", "composed"):
            raise ValueError(f"mode must be 'clip' or 'composed', got {mode!r}")
        check_range("points_per_class", points_per_class, 1, integer=True)
        check_range("threshold", threshold)  # finite: a class passes when its score is >= it
        if image is None:
            self._require_image()
        text = self.text_embeddings(labels, templates)
        if mode == "clip":
            rgb = self.image if image is None else to_rgb_uint8(image)
            return segment_clip(self, rgb, labels, text, self._check_side("resolution", resolution))
        if image is not None:
            self.set_image(image)
        self._require_image()
        return segment_composed(self, labels, text, threshold, points_per_class)
