"""HTTP payloads -> validated tasks for the model worker, or a :class:`RequestError` (a 4xx and its message).

Everything a request can get wrong is found here, in the HTTP process, before the request joins a
batch: a bad request never costs a backbone pass and never fails the requests batched with it.
That includes the predictor's own prompt rules (:mod:`fastsamclip.predictor.prompts`: a point or
box outside the image, a flipped box, a point label other than 1, 0, -1), checked against the
decoded image's size; the worker still answers any ValueError as 422 for that request alone.
A number is a JSON number: ``true`` is not 1 (a box ``[true, true, 60, 60]`` is refused).

Bodies:

* ``application/json``: an object; ``image`` is base64 (optionally a ``data:image/...;base64,``
  URL), the other fields JSON values;
* ``multipart/form-data``: ``image`` an uploaded file; every other field one JSON value
  (``labels=["cat", "dog"]``, ``boxes=[[10, 20, 200, 180]]``; a bare word is taken as a string).

The image is decoded here exactly as the predictor reads a file (PIL, then
``fastsamclip.transforms.to_rgb_uint8``), then resized for the model (``sam_pixels`` /
``clip_pixels``), so the worker receives (3, R, R) uint8 pixels, whatever the upload's size.

Status codes: 400 a body that cannot be read (bad JSON, bad base64, not an image, a truncated
image), 413 too large (bytes or pixels), 415 a content type other than the two above, 422 a
readable body with a missing, unknown or invalid field (NaN included).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from fastsamclip.errors import InputError
from fastsamclip.predictor.concepts import ConceptParams, check_texts
from fastsamclip.files import sha256_bytes
from fastsamclip.predictor.prompts import check_boxes, check_inside, check_point_labels
from fastsamclip.predictor.text import check_labels, templates_for
from fastsamclip.serve.cache import is_image_id
from fastsamclip.transforms import DECODE_ERRORS, clip_pixels, sam_pixels, to_rgb_uint8


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each bounds the work or memory a request can cost)."""

    max_request_bytes: int = 64 * 2**20  # body size, bytes
    max_image_pixels: int = 40_000_000  # decoded W x H (PIL's own bomb limit is 89M)
    max_labels: int = 1000  # classes per request (each costs 80 text-tower prompts the first time)
    max_prompts: int = 256  # P, prompts per segment request
    max_points: int = 64  # N, points per prompt
    max_resolution: int = 2048  # classify / semantic input side


@dataclass(frozen=True)
class Geometry:
    """The served model's sizes (from its checkpoint), which the HTTP process needs to prepare pixels."""

    img_size: int  # native SAM input side (1024 for ViT-B)
    patch_size: int


# Fields of each task (besides "image") and their defaults: the predictor's own defaults.
# ``image_id`` (an image kept by POST /v1/image, :mod:`fastsamclip.serve.cache`) stands for
# ``image`` where the task runs on the SAM pass at the native size, which is then not run again.
TASK_FIELDS: Dict[str, Dict[str, Any]] = {
    "embed": {"sam": False},
    "classify": {"labels": None, "resolution": 224, "templates": "openai"},
    # The pass kept under the image's id; labels: their text embeddings computed now, not at the first use.
    "image": {"labels": None, "templates": "openai"},
    # labels: each mask named (pooled per-patch CLIP, as generate names its masks).
    "segment": {"image_id": None, "points": None, "point_labels": None, "boxes": None, "multimask_output": True,
                "labels": None, "templates": "openai"},
    "semantic": {"image_id": None, "labels": None, "mode": "clip", "resolution": 448, "threshold": 0.5,
                 "points_per_class": 3, "templates": "openai"},
    # SAMCLIPPredictor.generate (SamAutomaticMaskGenerator's parameters); labels optional.
    "everything": {"image_id": None, "labels": None, "label_threshold": 0.0, "templates": "openai",
                   "points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88,
                   "stability_score_thresh": 0.95, "stability_score_offset": 1.0, "box_nms_thresh": 0.7,
                   "crop_n_layers": 0, "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500,
                   "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0},
    # SAMCLIPPredictor.segment_text (ConceptParams' defaults); phrases required.
    "concepts": {"image_id": None, "phrases": None,
                 **{k: v for k, v in ConceptParams().__dict__.items() if k != "output_mode"}},
}
# Bounds of the generator's integer parameters on this server (each multiplies a request's work).
EVERYTHING_INTS = {"points_per_side": (1, 64), "points_per_batch": (1, 1024), "crop_n_layers": (0, 2),
                   "crop_n_points_downscale_factor": (1, 8), "min_mask_region_area": (0, 10**8)}
# Bounds of segment_text's integer parameters on this server (each multiplies a request's work).
CONCEPT_INTS = {"max_peaks": (1, 256), "points_per_batch": (1, 1024)}
REQUIRED = {"classify": ("labels",), "semantic": ("labels",), "concepts": ("phrases",)}
OPTIONAL_LABELS = ("image", "segment", "everything")
IMAGE_ID_CHARS = 32  # of the sha256 of the image's bytes, in hex
JSON_TYPE, MULTIPART_TYPE = "application/json", "multipart/form-data"


# ------------------------------------------------------------------------------------ bodies
def media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_content_type(content_type: Optional[str]) -> str:
    kind = media_type(content_type)
    if kind not in (JSON_TYPE, MULTIPART_TYPE):
        raise RequestError(415, f"Content-Type must be {JSON_TYPE} (image as base64) or {MULTIPART_TYPE} "
                                f"(image as a file), got {content_type or 'none'!r}")
    return kind


def parse_json_body(body: bytes) -> Dict[str, Any]:
    """A JSON object (``image`` still base64 text)."""
    if not body:
        raise RequestError(400, "empty body: send a JSON object with an 'image' field")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def form_value(name: str, text: str) -> Any:
    """A multipart field: one JSON value, or the text itself when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def image_bytes(value: Any) -> bytes:
    """The ``image`` field: bytes (an upload) or base64 text (JSON)."""
    if value is None:
        raise RequestError(422, "missing field 'image' (base64 in JSON, or a file in multipart/form-data)")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"field 'image' is not valid base64: {e}") from None
    else:
        raise RequestError(422, f"field 'image' must be base64 text or an uploaded file, got {type(value).__name__}")
    if not data:
        raise RequestError(400, "field 'image' is empty")
    return data


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Bytes -> uint8 (H, W, 3), refusing what is not an image, truncated, or over the pixel limit
    (checked from the header, before any pixel is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise RequestError(413, f"image of {w}x{h} (WxH) = {w * h} pixels is over this server's limit "
                                        f"of {limits.max_image_pixels} pixels")
            im.load()  # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES stays False)
            return to_rgb_uint8(im)
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image too large: {e}") from None
    except DECODE_ERRORS as e:
        raise RequestError(400, f"field 'image' cannot be decoded as an image: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------ fields
def _bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise RequestError(422, f"field '{name}' must be true or false, got {v!r}")


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise RequestError(422, f"field '{name}' must be an integer, got {v!r}")
    if not lo <= int(v) <= hi:
        raise RequestError(422, f"field '{name}' must be in {lo}..{hi}, got {int(v)}")
    return int(v)


def _float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(422, f"field '{name}' must be a finite number, got {v!r}")
    return float(v)


def _has_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    return isinstance(v, (list, tuple)) and any(_has_bool(x) for x in v)


def _array(name: str, v: Any, ndims: Tuple[int, ...], last: Optional[int]) -> np.ndarray:
    """A finite float64 array of one of ``ndims`` dimensions, last axis ``last``; booleans are
    not numbers (numpy would read ``true`` as 1)."""
    if _has_bool(v):
        raise RequestError(422, f"field '{name}' must hold numbers, got true/false in {str(v)[:80]}")
    try:
        a = np.asarray(v, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(422, f"field '{name}' must be a (nested) list of numbers of equal lengths") from None
    if a.ndim not in ndims or (last is not None and a.shape[-1] != last) or a.size == 0:
        raise RequestError(422, f"field '{name}' has shape {list(a.shape)}; expected "
                                + " or ".join(f"{d}-D" for d in ndims) + (f" with last axis {last}" if last else ""))
    if not np.isfinite(a).all():
        raise RequestError(422, f"field '{name}' contains NaN or infinity")
    return a


def _labels(v: Any, limits: Limits) -> Tuple[str, ...]:
    try:
        labels = check_labels(v if isinstance(v, (list, str)) else [v])
    except (TypeError, ValueError) as e:
        raise RequestError(422, f"field 'labels': {e}") from None
    if len(labels) > limits.max_labels:
        raise RequestError(422, f"field 'labels' has {len(labels)} classes; this server takes at most {limits.max_labels}")
    return labels


def _templates(v: Any) -> str:
    if v not in ("openai", "simple"):
        raise RequestError(422, f"field 'templates' must be 'openai' or 'simple', got {v!r}")
    templates_for(v)
    return v


def check_fields(task: str, fields: Dict[str, Any], limits: Limits, geometry: Geometry) -> Dict[str, Any]:
    """The task's parameters with defaults filled in, each validated (not the image)."""
    spec = TASK_FIELDS[task]
    unknown = sorted(set(fields) - set(spec) - {"image"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown} for {task}; known: {['image', *spec]}")
    for name in REQUIRED.get(task, ()):
        if fields.get(name) is None:
            raise RequestError(422, f"missing field '{name}'")
    p = {k: (fields[k] if fields.get(k) is not None else d) for k, d in spec.items()}
    if "labels" in p:
        if p["labels"] is not None or task not in OPTIONAL_LABELS:
            p["labels"] = _labels(p["labels"], limits)
        p["templates"] = _templates(p["templates"])
    if "resolution" in p:
        p["resolution"] = _int("resolution", p["resolution"], geometry.patch_size, limits.max_resolution)
        if p["resolution"] % geometry.patch_size:
            raise RequestError(422, f"field 'resolution' must be a multiple of the patch size {geometry.patch_size}, "
                                    f"got {p['resolution']}")
    if task == "embed":
        p["sam"] = _bool("sam", p["sam"])
    elif task == "segment":
        p["multimask_output"] = _bool("multimask_output", p["multimask_output"])
        if p["points"] is None and p["boxes"] is None:
            raise RequestError(422, "missing field: give 'points' and/or 'boxes' (in image pixels)")
        if p["points"] is not None:
            pts = _array("points", p["points"], (2, 3), 2)
            pts = pts[None] if pts.ndim == 2 else pts
            if pts.shape[0] > limits.max_prompts or pts.shape[1] > limits.max_points:
                raise RequestError(422, f"field 'points' has {pts.shape[0]} prompts of {pts.shape[1]} points; "
                                        f"at most {limits.max_prompts} of {limits.max_points}")
            p["points"] = pts
            if p["point_labels"] is not None:
                lab = _array("point_labels", p["point_labels"], (1, 2), None)
                if lab.size != pts.shape[0] * pts.shape[1]:
                    raise RequestError(422, f"field 'point_labels' has {lab.size} labels for "
                                            f"{pts.shape[0] * pts.shape[1]} points")
                p["point_labels"] = lab.reshape(pts.shape[:2])
        elif p["point_labels"] is not None:
            raise RequestError(422, "field 'point_labels' without 'points'")
        if p["boxes"] is not None:
            boxes = _array("boxes", p["boxes"], (1, 2), 4)
            boxes = boxes[None] if boxes.ndim == 1 else boxes
            if boxes.shape[0] > limits.max_prompts:
                raise RequestError(422, f"field 'boxes' has {boxes.shape[0]} boxes; at most {limits.max_prompts}")
            p["boxes"] = boxes
    elif task == "everything":
        for name in p:
            if name in EVERYTHING_INTS:
                p[name] = _int(name, p[name], *EVERYTHING_INTS[name])
            elif name not in ("labels", "templates", "image_id"):
                p[name] = _float(name, p[name])
    elif task == "concepts":
        try:
            p["phrases"] = check_texts(p["phrases"], "field 'phrases'")
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        if len(p["phrases"]) > limits.max_labels:
            raise RequestError(422, f"field 'phrases' has {len(p['phrases'])} phrases; this server takes at most "
                                    f"{limits.max_labels}")
        for name, bounds in CONCEPT_INTS.items():
            p[name] = _int(name, p[name], *bounds)
        for name in ("threshold", "score_threshold", "nms_thresh"):
            p[name] = _float(name, p[name])
            if not 0.0 <= p[name] <= 1.0:
                raise RequestError(422, f"field '{name}' must be in [0, 1], got {p[name]:g}")
        p["templates"] = _templates(p["templates"])
        try:
            ConceptParams.from_kwargs({k: v for k, v in p.items() if k not in ("phrases", "image_id")})
        except ValueError as e:
            raise RequestError(422, f"field {e}") from None
    elif task == "semantic":
        if p["mode"] not in ("clip", "composed"):
            raise RequestError(422, f"field 'mode' must be 'clip' or 'composed', got {p['mode']!r}")
        p["threshold"] = _float("threshold", p["threshold"])
        p["points_per_class"] = _int("points_per_class", p["points_per_class"], 1, 64)
    if p.get("image_id") is not None:
        if "image" in fields:
            raise RequestError(422, "give 'image' or 'image_id', not both")
        if not is_image_id(p["image_id"]):
            raise RequestError(422, f"field 'image_id' must be an id as POST /v1/image returns it, got "
                                    f"{str(p['image_id'])[:80]!r}")
        if task == "semantic" and p["mode"] != "composed":
            raise RequestError(422, "field 'image_id' serves mode 'composed' (the kept pass is at the native "
                                    "size); mode 'clip' runs its own pass at its resolution: send 'image'")
    return p


# ------------------------------------------------------------------------------------ tasks
def geometry_of(task: str, params: Dict[str, Any], geometry: Geometry) -> Tuple[str, int]:
    """Which backbone pass a task needs: ("sam", side) for the SAM geometry, ("clip", side) for CLIP's.

    As the predictor: ``segment``, ``everything``, ``embed`` and composed ``semantic`` at the native
    size (what ``set_image`` / ``embed_images`` run), ``semantic`` clip mode at its resolution, ``classify``
    in CLIP's geometry at its resolution. Requests of one geometry share a pass."""
    if task == "classify":
        return "clip", params["resolution"]
    if task == "semantic" and params["mode"] == "clip":
        return "sam", params["resolution"]
    return "sam", geometry.img_size


def check_prompts(params: Dict[str, Any], original_size: Tuple[int, int]) -> None:
    """A segment request's prompts against the image, by the predictor's own rules (a 422)."""
    try:
        if params["points"] is not None:
            labels = params["point_labels"]
            if labels is not None:
                check_point_labels(labels)
            check_inside("point", params["points"], original_size, None if labels is None else labels != -1)
        if params["boxes"] is not None:
            check_boxes(params["boxes"], original_size)
    except InputError as e:
        raise RequestError(422, str(e)) from None


def make_task(task: str, fields: Dict[str, Any], limits: Limits, geometry: Geometry,
              images: Optional[Dict[str, Tuple[int, int]]] = None) -> Dict[str, Any]:
    """Fields (``image`` as bytes or base64) -> what the worker runs: pixels prepared for the pass
    (uint8 (3, R, R)), the image's sizes, and the validated parameters. With ``image_id`` instead of
    ``image``: no pixels and no pass (``"pass": None``); ``images`` maps the ids this server has
    kept to their (H, W) (a 404 for another id; its prompts are checked against that size)."""
    params = check_fields(task, fields, limits, geometry)
    image_id = params.get("image_id")
    if image_id is not None:
        if image_id not in (images or {}):
            raise RequestError(404, unknown_image(image_id))
        original_size = tuple(images[image_id])
        if task == "segment":
            check_prompts(params, original_size)
        return {"task": task, "pass": None, "image_id": image_id, "original_size": original_size, "params": params}
    data = image_bytes(fields.get("image"))
    rgb = decode_image(data, limits)
    if task == "segment":
        check_prompts(params, rgb.shape[:2])
    kind, side = geometry_of(task, params, geometry)
    if kind == "clip":
        pixels, hw = clip_pixels(rgb, side), (side, side)
    else:
        try:
            pixels, hw = sam_pixels(rgb, side)
        except ValueError as e:  # an image so elongated its short side resizes to 0 pixels
            raise RequestError(422, str(e)) from None
    task_ = {"task": task, "pass": (kind, side), "pixels": pixels.numpy(), "input_size": tuple(hw),
             "original_size": tuple(rgb.shape[:2]), "params": params}
    if task in ("everything", "image"):  # the generator crops the original image (crop layers) and sizes masks by it
        task_["image"] = rgb
    if task == "image":
        task_["image_id"] = sha256_bytes(data)[:IMAGE_ID_CHARS]
    return task_


def unknown_image(image_id: str) -> str:
    return (f"image_id {image_id!r} is not kept by this server (it keeps the last images uploaded to POST "
            "/v1/image, and forgets them when it restarts): upload the image again")
