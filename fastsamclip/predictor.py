"""Inference with the merged SAM-CLIP model: promptable masks, zero-shot labels, semantic maps.

    predictor = SAMCLIPPredictor("merged.safetensors")
    predictor.set_image(image)                        # ONE backbone pass at the native size
    masks, scores, low_res = predictor.segment(points=[[[x, y]]], point_labels=[[1]])
    probs = predictor.classify([image], ["cat", "dog"])
    result = predictor.semantic_segment(image, ["cat", "dog", "grass"], mode="composed")

``set_image``/``segment``/``reset_image`` behave as ``segment_anything.SamPredictor``'s
``set_image``/``predict``/``reset_image``: prompts are in ORIGINAL image pixels, mapped with
SAM's ResizeLongestSide rule to the model's native input size, and masks come back at the
original size (low-res logits upscaled to the padded input, cropped, resized). At
initialisation the merged model's SAM side is the SAM teacher, so ``segment`` equals
``SamPredictor(sam).predict`` on the same image and prompts (tested).

Image conversion rule (``to_rgb_uint8``), applied to every image argument:
- a path is decoded with PIL; a PIL image is converted to an array first (16-bit modes kept 16-bit);
- (H, W) and (H, W, 1) grayscale are replicated to 3 channels; (H, W, 2) is grayscale + alpha;
- an alpha channel is dropped (not composited), as ``PIL.Image.convert("RGB")`` does;
- uint8 is used as is; uint16 (and PIL's 16-bit modes) is scaled by its full range
  (``round(v / 257)``); other integer types are taken as 8-bit when all values fit in 0..255,
  as 16-bit when they fit in 0..65535, and refused otherwise; floats are taken as 0..1 when
  their maximum is <= 1, else as 0..255, and clipped; bool is 0 / 255.
Tiny images are upscaled by the resize (the longest side always becomes the native size).

Resolutions: ``set_image``, ``embed_images`` and the "composed" semantic mode use the SAM
geometry (resize the longest side, pad bottom/right) at the model's native size, so every pixel
is covered; ``classify`` uses CLIP's geometry (resize the shortest side, centre crop) at
``resolution`` (default 224, the CLIP teacher's usual size); the "clip" semantic mode uses the
SAM geometry at ``resolution`` (default 448, the paper's setting). The backbone always sees
SAM-normalised pixels, as in training.

The backbone runs eagerly (what the CPU uses). ``compile=True`` wraps the model's forward with
``torch.compile(fullgraph=True, dynamic=False)``, one compiled function per input resolution and
batch size (static shapes, so each compiles once and never recompiles); on CUDA the default mode
is "reduce-overhead" (CUDA graphs: static shapes make them safe). ``warmup(resolutions,
batch_sizes)`` compiles ahead of the first request and reports the seconds each took;
``cache_dir`` points Inductor's on-disk cache somewhere persistent, so a second process starts
warm. ``gpu_preprocess=True`` resizes and normalises on the GPU with the CUDA C++ kernel
(``fastsamclip.kernels.preprocess``; bilinear without antialias, so downscaled inputs differ
slightly from the PIL path used otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from fastsamclip.checkpoint import load_merged
from fastsamclip.kernels.preprocess import postprocess_logits_reference
from fastsamclip.data import apply_boxes, apply_coords, get_preprocess_shape, preprocess_clip_image, preprocess_sam_image
from fastsamclip.modeling.samclip import SAMCLIP
from fastsamclip.teachers import SAM_PIXEL_MEAN, SAM_PIXEL_STD

ImageLike = Union[np.ndarray, torch.Tensor, "os.PathLike", str, "PIL.Image.Image"]  # noqa: F821

# SAM's binarisation threshold on mask logits (``Sam.mask_threshold``).
MASK_THRESHOLD = 0.0
# CLIP's learned temperature is clamped at 100 in training; used when a text tower has none.
DEFAULT_LOGIT_SCALE = 100.0


class ImageReadError(ValueError):
    """An image file that cannot be opened or decoded."""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return _scale_to_uint8(a.astype(np.uint16))
        raise ValueError(f"integer image of dtype {a.dtype} with values {lo}..{hi}: expected 0..255 (8-bit) "
                         "or 0..65535 (16-bit)")
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32), nan=0.0)
        scale = 255.0 if (a.size == 0 or float(a.max()) <= 1.0) else 1.0
        return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {a.dtype}")


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image -> uint8 (H, W, 3) RGB (the rule is in the module docstring).

    Raises ImageReadError for a file that cannot be decoded, ValueError for an array of an
    unsupported shape or dtype.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here with its name
                image = im.copy()
        except FileNotFoundError as e:
            raise ImageReadError(f"cannot read image {path}: no such file") from e
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if isinstance(image, Image.Image):
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
            image = image.convert("RGB")
        a = np.asarray(image)
        if image.mode.startswith("I;16"):
            a = a.astype(np.uint16)
    elif isinstance(image, torch.Tensor):
        a = image.detach().cpu().numpy()
    else:
        a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image (channels last), "
                         f"got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image of shape {tuple(a.shape)}")
    a = a[..., :1] if a.shape[2] == 2 else a[..., :3]  # drop alpha
    a = _scale_to_uint8(a)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def postprocess_masks(low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                      img_size: int) -> torch.Tensor:
    """``Sam.postprocess_masks``: (P, K, 4gh, 4gw) low-res logits -> (P, K, H, W) logits.

    Upscale to the padded input (img_size x img_size), crop the padding away (input_size, the
    resized image before padding), resize to the original (H, W); bilinear, align_corners=False.
    """
    return postprocess_logits_reference(low_res, input_size, img_size, original_size)


def _check_labels(labels: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of class names, got the string {labels!r} "
                        "(write [\"cat\", \"dog\"], not \"cat,dog\")")
    labels = tuple(labels)
    if not labels:
        raise ValueError("the label list is empty: give at least one class name")
    bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip()]
    if bad:
        raise ValueError(f"every label must be a non-empty string, got {bad!r}")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"labels repeat: {dup} (each class once, or the argmax is ambiguous)")
    return labels


def _templates(templates) -> Tuple[Callable[[str], str], ...]:
    import open_clip.zero_shot_metadata as zsm

    if templates in (None, "openai"):
        return tuple(zsm.OPENAI_IMAGENET_TEMPLATES)  # the 80 prompts of the CLIP paper (DESIGN: inference)
    if templates == "simple":
        return tuple(zsm.SIMPLE_IMAGENET_TEMPLATES)
    if isinstance(templates, str):
        raise ValueError(f"templates must be 'openai', 'simple' or a list, got {templates!r}")
    out = tuple((lambda c, t=t: t.format(c)) if isinstance(t, str) else t for t in templates)
    if not out:
        raise ValueError("the template list is empty")
    return out


@dataclass
class SemanticResult:
    """What ``semantic_segment`` returns.

    label_map: (H, W) int64, the class index per pixel, -1 for background (composed mode: no
        class mask positive there; clip mode never gives -1).
    scores: (L, H, W) float32 per-class maps at the original size: clip mode the softmax
        probabilities; composed mode the sigmoid of the SAM head's mask logits (0 for classes
        that were not prompted).
    class_scores: (L,) the maximum coarse CLIP score of each class (what the threshold tests).
    prompted: indices of the classes the SAM head was prompted with (composed mode).
    points: per prompted class, the (x, y) points in original pixels given to the SAM head.
    """

    label_map: np.ndarray
    scores: np.ndarray
    labels: Tuple[str, ...]
    mode: str
    class_scores: np.ndarray
    prompted: List[int] = field(default_factory=list)
    points: Dict[int, List[Tuple[float, float]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------


class SAMCLIPPredictor:
    """Promptable segmentation, zero-shot classification and semantic segmentation with one model.

    model_or_checkpoint_path: a ``SAMCLIP`` or the path of a merged ``.safetensors`` checkpoint
    (anything else raises ``CheckpointError`` from ``load_merged``, naming the command that makes
    one). device: default CUDA when available, else CPU. compile: wrap the model's forward with
    ``torch.compile(fullgraph=True, dynamic=False)``, one compiled function per resolution;
    compile_backend picks the torch.compile backend (default inductor).
    """

    def __init__(self, model_or_checkpoint_path: Union[SAMCLIP, str, "os.PathLike"], device=None,
                 compile: bool = False, compile_backend: str = "inductor", compile_mode: Optional[str] = None,
                 cache_dir: Optional[str] = None, gpu_preprocess: bool = False) -> None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cache_dir is not None:
            # Inductor reads its cache location when it first compiles; set it before that.
            os.makedirs(cache_dir, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(cache_dir)
            import torch._inductor.config as inductor_config

            inductor_config.fx_graph_cache = True
        if gpu_preprocess and device.type != "cuda":
            raise ValueError("gpu_preprocess=True needs a CUDA device; the CPU path is used otherwise")
        if isinstance(model_or_checkpoint_path, SAMCLIP):
            model = model_or_checkpoint_path.to(device).eval()
        else:
            model = load_merged(os.fspath(model_or_checkpoint_path), device)
        self.model = model
        self.device = device
        self.img_size = int(model.config.sam.backbone.img_size)
        self.patch_size = int(model.config.sam.backbone.patch_size)
        self.compile = compile
        self.compile_backend = compile_backend
        # CUDA graphs ("reduce-overhead") replay the whole static-shape graph with one launch.
        self.compile_mode = compile_mode or ("reduce-overhead" if device.type == "cuda" and
                                             compile_backend == "inductor" else None)
        self.gpu_preprocess = gpu_preprocess
        self._compiled: Dict[Tuple[int, int], Callable] = {}
        self._text_cache: Dict[tuple, torch.Tensor] = {}
        self.reset_image()

    # ---------------------------------------------------------------- backbone
    def _forward(self, x: torch.Tensor, clip: bool = True, sam: bool = True, clip_patches: bool = False):
        """``model.forward`` on SAM-normalised (B, 3, H, W), compiled per (H, W) when asked."""
        if not self.compile:
            return self.model(x, clip=clip, sam=sam, clip_patches=clip_patches)
        key = (tuple(x.shape), clip, sam, clip_patches)
        fn = self._compiled.get(key)
        if fn is None:
            model = self.model

            def run(t):
                return model(t, clip=clip, sam=sam, clip_patches=clip_patches)

            kw = {"mode": self.compile_mode} if self.compile_mode else {}
            fn = torch.compile(run, fullgraph=True, dynamic=False, backend=self.compile_backend, **kw)
            self._compiled[key] = fn
        out = fn(x)
        if self.compile_mode == "reduce-overhead":
            # CUDA-graph outputs live in memory the next replay overwrites: keep copies.
            out = {k: v.clone() for k, v in out.items()}
        return out

    @torch.no_grad()
    def warmup(self, resolutions: Optional[Sequence[int]] = None, batch_sizes: Sequence[int] = (1,),
               outputs: Sequence[str] = ("set_image",)) -> Dict[str, float]:
        """Run (and, with ``compile=True``, compile) every (resolution, batch) ahead of requests.

        resolutions: input sides (default: the native size); outputs: "set_image" (both heads
        and per-patch CLIP, what ``set_image`` runs), "embed" (``embed_images``: pooled CLIP and
        SAM), "clip" (``classify``: pooled CLIP only). Returns seconds per case; the first
        call of a case includes its compile, so these are the cold start costs.
        """
        import time

        heads = {"set_image": dict(clip=True, sam=True, clip_patches=True),
                 "embed": dict(clip=True, sam=True, clip_patches=False),
                 "clip": dict(clip=True, sam=False, clip_patches=False)}
        unknown = set(outputs) - set(heads)
        if unknown:
            raise ValueError(f"warmup outputs must be among {sorted(heads)}, got {sorted(unknown)}")
        dtype = next(self.model.parameters()).dtype
        times: Dict[str, float] = {}
        for res in resolutions or (self.img_size,):
            if res % self.patch_size:
                raise ValueError(f"warmup resolution {res} is not a multiple of {self.patch_size}")
            for b in batch_sizes:
                for name in outputs:
                    x = torch.randn(b, 3, res, res, device=self.device, dtype=dtype)
                    t0 = time.perf_counter()
                    self._forward(x, **heads[name])
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    times[f"{name} {res}px batch {b}"] = time.perf_counter() - t0
        return times

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

    @torch.no_grad()
    def set_image(self, image: ImageLike) -> None:
        """One backbone pass at the native size; caches both heads' outputs for the image.

        image: uint8 (H, W, 3) RGB array, PIL image or path (other formats: see the module's rule).
        Afterwards ``original_size`` = (H, W), ``input_size`` = the resized (h, w) before padding,
        ``features`` (1, C, gh, gw), ``clip_embedding`` (1, E), ``clip_patches`` (1, gh, gw, E).
        """
        rgb = to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        if min(get_preprocess_shape(h, w, self.img_size)) < 1:
            raise ValueError(f"image of {w}x{h} (WxH) is too elongated: its short side would resize "
                             f"to 0 pixels at {self.img_size}")
        if self.gpu_preprocess:
            from fastsamclip.kernels.preprocess import preprocess

            img = torch.from_numpy(rgb).to(self.device, non_blocking=True)
            # The same launch writes a CLIP crop too; set_image needs none, so ask for the
            # smallest one (a patch) rather than a second code path.
            x, input_size, _ = preprocess(img, sam_side=self.img_size, clip_side=self.patch_size)
            x = x[None]
        else:
            x, input_size = preprocess_sam_image(rgb, self.img_size)
            x = x[None].to(self.device)
        out = self._forward(x, clip=True, sam=True, clip_patches=True)
        self.reset_image()
        self.image = rgb
        self.original_size = (h, w)
        self.input_size = tuple(input_size)
        self.features = out["sam"]
        self.clip_embedding = out["clip"]
        self.clip_patches = out["clip_patches"]
        self.is_image_set = True

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image(image) first")

    # ---------------------------------------------------------------- promptable masks
    def _check_inside(self, what: str, xy: np.ndarray, valid: Optional[np.ndarray] = None) -> None:
        """Points may lie anywhere on the image, edges included: 0 <= x <= W, 0 <= y <= H."""
        h, w = self.original_size
        bad = ~np.isfinite(xy).all(-1) | (xy[..., 0] < 0) | (xy[..., 0] > w) | (xy[..., 1] < 0) | (xy[..., 1] > h)
        if valid is not None:
            bad &= valid
        if bad.any():
            p, i = (int(v) for v in np.argwhere(bad)[0])
            x, y = xy[p, i]
            raise ValueError(f"{what} {i} of prompt {p} at (x={x:g}, y={y:g}) is outside the image of "
                             f"{w}x{h} (WxH) pixels; prompts are in original image pixels")

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
            raise ValueError("segment: give at least one prompt (points, boxes or mask_input)")
        coords = labels = box_t = mask_t = None
        sizes = {}
        if points is not None:
            pts = np.asarray(points.cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
            pts = pts[None] if pts.ndim == 2 else pts
            if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[1] == 0:
                raise ValueError(f"points must be (P, N, 2) or (N, 2) XY, got shape {pts.shape}")
            if point_labels is None:
                lab = np.ones(pts.shape[:2], dtype=np.int64)
            else:
                lab = np.asarray(point_labels.cpu() if isinstance(point_labels, torch.Tensor) else point_labels)
                lab = lab.reshape(pts.shape[:2]) if lab.size == pts.shape[0] * pts.shape[1] else lab
                if lab.shape != pts.shape[:2]:
                    raise ValueError(f"point_labels shape {lab.shape} does not match points {pts.shape[:2]}")
                if not np.isin(lab, (-1, 0, 1)).all():
                    raise ValueError(f"point labels must be 1 (foreground), 0 (background) or -1 (padding), "
                                     f"got {sorted(set(np.unique(lab).tolist()))}")
            self._check_inside("point", pts, lab != -1)
            # Float64 mapping then float32, exactly as SamPredictor.predict does.
            coords = torch.as_tensor(apply_coords(pts, self.original_size, self.img_size), dtype=torch.float)
            labels = torch.as_tensor(lab, dtype=torch.int)
            sizes["points"] = pts.shape[0]
        if boxes is not None:
            bx = np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
            bx = bx[None] if bx.ndim == 1 else bx
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise ValueError(f"boxes must be (P, 4) or (4,) XYXY, got shape {bx.shape}")
            self._check_inside("box corner", bx.reshape(-1, 2, 2))
            flipped = (bx[:, 2] < bx[:, 0]) | (bx[:, 3] < bx[:, 1])
            if flipped.any():
                p = int(np.argwhere(flipped)[0][0])
                raise ValueError(f"box of prompt {p} {bx[p].tolist()} has x1 < x0 or y1 < y0; boxes are XYXY")
            box_t = torch.as_tensor(apply_boxes(bx, self.original_size, self.img_size), dtype=torch.float)
            sizes["boxes"] = bx.shape[0]
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input.cpu() if isinstance(mask_input, torch.Tensor)
                                                else mask_input), dtype=torch.float)
            mask_t = mask_t[None] if mask_t.dim() == 3 else mask_t
            low = tuple(4 * s for s in self.features.shape[-2:])
            if mask_t.dim() != 4 or mask_t.shape[1] != 1 or tuple(mask_t.shape[-2:]) != low:
                raise ValueError(f"mask_input must be (P, 1, {low[0]}, {low[1]}) low-res logits, got {tuple(mask_t.shape)}")
            sizes["mask_input"] = mask_t.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {sizes}; give the same number P of each kind")
        low_res, scores = self._decode(coords, labels, box_t, mask_t, multimask_output)
        masks = postprocess_masks(low_res, self.input_size, self.original_size, self.img_size)
        if not return_logits:
            masks = masks > MASK_THRESHOLD
        return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

    def _decode(self, coords, labels, boxes, masks, multimask_output: bool):
        """Prompts already in the (padded) input frame -> (low-res logits (P, K, 4gh, 4gw), scores (P, K))."""
        dev = self.device
        pts = (coords.to(dev), labels.to(dev)) if coords is not None else None
        with torch.no_grad():
            return self.model.predict_masks(
                self.features, (self.img_size, self.img_size), points=pts,
                boxes=boxes.to(dev) if boxes is not None else None,
                masks=masks.to(dev) if masks is not None else None, multimask_output=multimask_output)

    # ---------------------------------------------------------------- text side
    def logit_scale(self) -> float:
        """The CLIP teacher's temperature (its learned ``logit_scale``, at most 100)."""
        ls = getattr(self.model.text, "logit_scale", None)
        return float(min(ls.exp().item(), 100.0)) if isinstance(ls, torch.Tensor) else DEFAULT_LOGIT_SCALE

    @torch.no_grad()
    def text_embeddings(self, labels: Sequence[str], templates="openai") -> torch.Tensor:
        """(L, E) unit class embeddings: the mean of the unit embeddings of every template filled
        with the class name, renormalised (the CLIP zero-shot recipe). Cached per label tuple."""
        labels = _check_labels(labels)
        tmpl = _templates(templates)
        key = (labels, templates if isinstance(templates, str) or templates is None else id(templates))
        if key not in self._text_cache:
            prompts = [t(lab) for lab in labels for t in tmpl]
            tokens = self.model.tokenizer(prompts)
            emb = torch.cat([self.model.encode_text(tokens[i:i + 256].to(self.device), normalize=True)
                             for i in range(0, len(prompts), 256)])
            emb = emb.float().view(len(labels), len(tmpl), -1).mean(1)
            self._text_cache[key] = F.normalize(emb, dim=-1)
        return self._text_cache[key]

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
        res = int(resolution or self.img_size)
        rgbs = self._as_list(images)
        prepped = [preprocess_sam_image(im, res) for im in rgbs]
        outs = []
        for i in range(0, len(prepped), batch_size):
            x = torch.stack([p[0] for p in prepped[i:i + batch_size]]).to(self.device)
            outs.append(self._forward(x, clip=True, sam=True, clip_patches=True))
        result = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        result["input_sizes"] = torch.tensor([p[1] for p in prepped])
        return result

    @torch.no_grad()
    def classify(self, images, labels: Sequence[str], resolution: int = 224, templates="openai",
                 batch_size: int = 32) -> np.ndarray:
        """Zero-shot probabilities (B, L): softmax over classes of scale * cos(image, class).

        images: one image or a list; each is resized (shortest side) and centre-cropped to
        ``resolution`` (CLIP's eval geometry, SAM-normalised) and run in batches of ``batch_size``.
        """
        text = self.text_embeddings(labels, templates)
        rgbs = self._as_list(images)
        # CLIP geometry with SAM's normalisation (what the CLIP stream was trained on).
        mean = [m / 255.0 for m in SAM_PIXEL_MEAN]
        std = [s / 255.0 for s in SAM_PIXEL_STD]
        pooled = []
        for i in range(0, len(rgbs), batch_size):
            x = torch.stack([preprocess_clip_image(im, resolution, mean, std) for im in rgbs[i:i + batch_size]])
            pooled.append(self._forward(x.to(self.device), clip=True, sam=False)["clip"].float())
        img = F.normalize(torch.cat(pooled), dim=-1)
        return (self.logit_scale() * img @ text.T).softmax(-1).cpu().numpy()

    # ---------------------------------------------------------------- semantic segmentation
    def _class_maps(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(1, gh, gw, E) per-patch embeddings, (L, E) unit text -> (L, gh, gw) softmax over classes."""
        cos = F.normalize(patches[0].float(), dim=-1) @ text.T  # (gh, gw, L)
        return (self.logit_scale() * cos).softmax(-1).permute(2, 0, 1)

    @torch.no_grad()
    def semantic_segment(self, image: Optional[ImageLike], labels: Sequence[str], mode: str = "clip",
                         resolution: int = 448, threshold: float = 0.5, points_per_class: int = 3,
                         templates="openai") -> SemanticResult:
        """Zero-shot semantic segmentation of one image into ``labels`` (see ``SemanticResult``).

        mode "clip": CLIP-head per-patch embeddings at ``resolution`` (SAM geometry) -> cosine with
        the class embeddings -> softmax over classes -> bilinear upsampling to the image (upscale to
        the padded input, crop, resize) -> argmax. ``threshold`` and ``points_per_class`` unused.

        mode "composed": ``set_image(image)`` (one native pass; ``image=None`` reuses the current
        one) -> coarse class maps from the same pass's per-patch embeddings -> for every class
        whose maximum score over the image passes ``threshold``, 1..points_per_class points at its
        highest-scoring patches (more points the more confident: n = 1 + round((p - 1) * (max -
        threshold) / (1 - threshold))), kept at least 2 patches apart; these points plus the
        class's coarse map (as logits, resized to the decoder's 4x grid) prompt the SAM head, one
        prompt per class, one mask each -> masks at the original size -> per-pixel argmax of the
        logits across classes, background (-1) where no class logit is positive.
        """
        labels = _check_labels(labels)
        if mode not in ("clip", "composed"):
            raise ValueError(f"mode must be 'clip' or 'composed', got {mode!r}")
        if points_per_class < 1:
            raise ValueError(f"points_per_class must be >= 1, got {points_per_class}")
        text = self.text_embeddings(labels, templates)
        if mode == "clip":
            return self._semantic_clip(image, labels, text, resolution)
        if image is not None:
            self.set_image(image)
        self._require_image()
        return self._semantic_composed(labels, text, threshold, points_per_class)

    def _semantic_clip(self, image, labels, text, resolution: int) -> SemanticResult:
        if resolution % self.patch_size:
            raise ValueError(f"resolution must be a multiple of the patch size {self.patch_size}, got {resolution}")
        rgb = self.image if image is None and self.is_image_set else to_rgb_uint8(image)
        x, input_size = preprocess_sam_image(rgb, resolution)
        patches = self._forward(x[None].to(self.device), clip=False, sam=False, clip_patches=True)["clip_patches"]
        probs = self._class_maps(patches, text)  # (L, g, g)
        scores = postprocess_masks(probs[None], input_size, rgb.shape[:2], resolution)[0]
        gh, gw = (-(-s // self.patch_size) for s in input_size)
        class_scores = probs[:, :gh, :gw].flatten(1).amax(1)
        return SemanticResult(label_map=scores.argmax(0).cpu().numpy(), scores=scores.cpu().numpy(),
                              labels=labels, mode="clip", class_scores=class_scores.cpu().numpy())

    def _semantic_composed(self, labels, text, threshold: float, points_per_class: int) -> SemanticResult:
        probs = self._class_maps(self.clip_patches, text)  # (L, g, g) on the padded native grid
        g_h, g_w = probs.shape[-2:]
        # Only patches that hold image pixels may be picked (the rest is padding).
        vh, vw = (-(-s // self.patch_size) for s in self.input_size)
        valid = probs[:, :vh, :vw]
        class_scores = valid.flatten(1).amax(1)
        prompted, point_sets = [], []
        for c in range(len(labels)):
            top = float(class_scores[c])
            if top < threshold:
                continue
            conf = 1.0 if threshold >= 1 else (top - threshold) / (1.0 - threshold)
            n = 1 + int(round((points_per_class - 1) * min(max(conf, 0.0), 1.0)))
            order = torch.argsort(valid[c].flatten(), descending=True)
            picked: List[Tuple[int, int]] = []
            for idx in order.tolist():
                r, q = divmod(idx, vw)
                if all(max(abs(r - r0), abs(q - q0)) >= 2 for r0, q0 in picked):
                    picked.append((r, q))
                    if len(picked) == n:
                        break
            prompted.append(c)
            point_sets.append(picked)
        h, w = self.original_size
        scores = torch.zeros(len(labels), h, w)
        label_map = torch.full((h, w), -1, dtype=torch.int64)
        points_out: Dict[int, List[Tuple[float, float]]] = {}
        if prompted:
            n_max = max(len(p) for p in point_sets)
            coords = torch.zeros(len(prompted), n_max, 2)
            plabels = torch.full((len(prompted), n_max), -1, dtype=torch.int)  # -1: padding, ignored by SAM
            for k, picked in enumerate(point_sets):
                for j, (r, q) in enumerate(picked):
                    # Patch centre in the padded input frame (where SAM's coordinates live).
                    coords[k, j] = torch.tensor([(q + 0.5) * self.patch_size, (r + 0.5) * self.patch_size])
                    plabels[k, j] = 1
                sx, sy = w / self.input_size[1], h / self.input_size[0]
                points_out[prompted[k]] = [(float(x) * sx, float(y) * sy) for x, y in coords[k, :len(picked)].tolist()]
            mask_logits = self._coarse_mask_logits(probs[prompted], (vh, vw))
            low_res, _ = self._decode(coords, plabels, None, mask_logits, multimask_output=False)
            logits = postprocess_masks(low_res, self.input_size, self.original_size, self.img_size)[:, 0].cpu()
            best, arg = logits.max(0)
            label_map = torch.where(best > MASK_THRESHOLD, torch.tensor(prompted)[arg], label_map)
            scores[prompted] = logits.sigmoid()
        return SemanticResult(label_map=label_map.numpy(), scores=scores.numpy(), labels=labels, mode="composed",
                              class_scores=class_scores.cpu().numpy(), prompted=prompted, points=points_out)

    def _coarse_mask_logits(self, probs: torch.Tensor, valid: Tuple[int, int]) -> torch.Tensor:
        """(P, g, g) class probabilities -> (P, 1, 4g, 4g) mask-prompt logits on the decoder's grid.

        logit(p) turns probability 0.5 into the decision boundary 0, as SAM's own low-res logits;
        eps = 1e-3 bounds them to +-6.9, the range of SAM's typical mask logits. The padding
        patches are set to the most negative value: no image there.
        """
        p = probs.clone()
        p[:, valid[0]:, :] = 0.0
        p[:, :, valid[1]:] = 0.0
        up = F.interpolate(p[:, None], scale_factor=4, mode="bilinear", align_corners=False)
        return torch.logit(up, eps=1e-3)
