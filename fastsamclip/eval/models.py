"""The models under evaluation behind one interface: the merged SAM-CLIP model and each teacher.

- ``MergedModel``: a merged checkpoint through ``SAMCLIPPredictor`` (every task).
- ``CLIPTeacherModel``: the CLIP teacher through ``fastsamclip.modeling.CLIPTeacher`` and
  open_clip's own zero-shot classifier builder (classify, retrieval).
- ``SAMTeacherModel``: the SAM teacher through ``segment_anything.SamPredictor`` (instances).
- ``SAMThenCLIPModel``: both teachers as people pair them (instances named by class: SAM's
  automatic mask generator, the CLIP teacher on every mask's box crop).

Instances named by class (``named_instances``, ``eval instances --prompts text|everything``): the
merged model's ``segment_text`` with every class name as a phrase; or every mask of a generator
named with the class names and the background prompts, kept when named as a class. Each instance
is scored as ``segment_text`` scores its own (``concepts.instance_score``: the geometric mean of
the predicted IoU and the name's probability), so the pipelines differ only in how they find and
name masks.

The predictor serves one image at a time for prompts; the evaluation batches the image side
itself, on top of the model's public forward (``model(images, clip=..., sam=...,
clip_patches=...)``), with the predictor's own rules and functions:
- pooled CLIP embeddings (classify, retrieval) in CLIP's geometry (``transforms.clip_pixels``)
  normalised by the model itself, exactly what ``SAMCLIPPredictor.classify`` runs;
- the CLIP-head semantic mode: SAM's geometry at the resolution, the predictor's class maps
  (``predictor.semantic.class_maps``) mapped back to the image (``transforms.postprocess_masks``):
  what ``semantic_segment(mode="clip")`` runs. Both equalities are tested.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from fastsamclip.eval.classnames import templates as get_templates
from fastsamclip.eval.common import EvalInputError
from fastsamclip.files import sha256_file
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.predictor.concepts import instance_score
from fastsamclip.predictor.semantic import class_maps
from fastsamclip.transforms import clip_pixels, postprocess_masks, sam_pixels

TEXT_BATCH = 256  # prompts per text-tower forward
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at 100


class EvalModel:
    """What a task asks of a model; a model that cannot do a task says why (``unsupported``)."""

    kind = ""
    tasks: Sequence[str] = ()

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.info: Dict[str, object] = {"kind": self.kind}

    why_not: Dict[str, str] = {}

    def unsupported(self, task: str) -> Optional[str]:
        if task in self.tasks:
            return None
        return f"the {self.kind} cannot run `eval {task}`" + (f" ({self.why_not[task]})" if task in self.why_not else "")

    def _lacks(self, what: str):
        return TypeError(f"the {self.kind} has no {what} (ask unsupported(task) first)")

    # image-text side ------------------------------------------------------------------------
    def default_resolution(self, task: str) -> int:
        raise self._lacks("default resolution")

    def image_embeddings(self, rgbs: List[np.ndarray], resolution: int) -> torch.Tensor:
        """(B, E) unit pooled image embeddings."""
        raise self._lacks("image embeddings")

    def class_embeddings(self, names: Sequence[str], templates: str) -> torch.Tensor:
        """(L, E) unit zero-shot class embeddings (mean of the templates' unit embeddings)."""
        raise self._lacks("text side")

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) unit embeddings of the texts as given (captions)."""
        raise self._lacks("text side")

    def logit_scale(self) -> float:
        raise self._lacks("text side")

    def named_instances(self, rgb: np.ndarray, names: Sequence[str], prompts: str, background: Sequence[str],
                        templates: str = "openai", points_per_side: int = 32, text_params: Optional[dict] = None,
                        everything_params: Optional[dict] = None):
        """Every instance of each class name in the image (see the module docstring): (masks (n, H, W)
        bool, class indices (n,), scores (n,)). points_per_side: the generator's grid ("everything");
        text_params: more of ``segment_text``'s parameters ("text"); everything_params: more of the
        generator's (SamAutomaticMaskGenerator's, "everything")."""
        raise self._lacks(f"{prompts} prompts")

    # SAM side -------------------------------------------------------------------------------
    def box_masks(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(P, 4) XYXY boxes in image pixels -> (P, H, W) bool, one mask per box (no multimask)."""
        raise self._lacks("mask decoder")


def _instances(rgb: np.ndarray, masks: list, classes: list, scores: list):
    h, w = rgb.shape[:2]
    stacked = np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), bool)
    return stacked, np.asarray(classes, np.int64), np.asarray(scores, np.float64)


def _named_masks(records: List[dict], probs: np.ndarray, n_names: int):
    """Generator records and their (M, names + background) probabilities -> the masks named as a class."""
    keep = [(r, int(k), float(p[k])) for r, p in zip(records, probs) for k in [int(np.argmax(p))] if k < n_names]
    return ([r["segmentation"] for r, _, _ in keep], [k for _, k, _ in keep],
            [float(instance_score(r["predicted_iou"], pk)) for r, _, pk in keep])


def zero_shot_classifier(model, tokenizer, names: Sequence[str], templates: str, device) -> torch.Tensor:
    """(L, E) unit class embeddings through open_clip's ``build_zero_shot_classifier`` (the CLIP
    recipe: mean of the unit embeddings of every template filled with the name, renormalised);
    ``model`` is anything with ``encode_text(tokens, normalize=True)``."""
    tmpl = get_templates(templates)
    return build_zero_shot_classifier(model, tokenizer, list(names), tmpl,
                                      num_classes_per_batch=max(1, TEXT_BATCH // len(tmpl)), device=device).T.float()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class MergedModel(EvalModel):
    kind = "merged SAM-CLIP model"
    tasks = ("classify", "semantic", "instances", "retrieval")

    def __init__(self, checkpoint, device: torch.device, hash_file: bool = True, dtype="auto",
                 clip_token_pool: int = 1) -> None:
        super().__init__(device)
        self.predictor = checkpoint if isinstance(checkpoint, SAMCLIPPredictor) else SAMCLIPPredictor(
            checkpoint, device=device, dtype=dtype, clip_token_pool=clip_token_pool)
        self.model = self.predictor.model
        cfg = self.model.config
        self.native_size = self.predictor.img_size
        self.info.update({"checkpoint": None if isinstance(checkpoint, SAMCLIPPredictor) else os.path.abspath(checkpoint),
                          "sha256": sha256_file(checkpoint) if hash_file and isinstance(checkpoint, (str, os.PathLike)) else None,
                          "backbone": {"embed_dim": cfg.sam.backbone.embed_dim, "depth": cfg.sam.backbone.depth,
                                       "img_size": cfg.sam.backbone.img_size},
                          "text_model": cfg.text_model_name,
                          "dtype": str(self.predictor.dtype).replace("torch.", ""),
                          "clip_token_pool": self.predictor.forward.clip_token_pool})

    def unsupported(self, task: str) -> Optional[str]:
        if task in ("classify", "semantic", "retrieval") and self.model.text is None:
            return "this merged checkpoint has no text tower (it was merged without a CLIP teacher)"
        return super().unsupported(task)

    def default_resolution(self, task: str) -> int:
        return {"classify": 224, "retrieval": 224, "semantic": 448}.get(task, self.native_size)

    @torch.no_grad()
    def image_embeddings(self, rgbs, resolution):
        x = torch.stack([clip_pixels(im, resolution) for im in rgbs]).to(self.device)
        return _unit(self.predictor.forward(self.model.preprocess(x), clip=True, sam=False)["clip"])

    def class_embeddings(self, names, templates):
        # open_clip's builder rather than SAMCLIPPredictor.text_embeddings: the same recipe (tested
        # equal), but it accepts repeated names, which ImageNet's CLIP list has ("missile",
        # "sunglasses" twice each); such classes tie exactly and rank by index (see metrics).
        return zero_shot_classifier(self.model, self.model.tokenizer, names, templates, self.device)

    @torch.no_grad()
    def text_embeddings(self, texts):
        tok = self.model.tokenizer
        return torch.cat([self.model.encode_text(tok(list(texts[i:i + TEXT_BATCH])).to(self.device), normalize=True).float()
                          for i in range(0, len(texts), TEXT_BATCH)])

    def logit_scale(self) -> float:
        return self.predictor.logit_scale()

    @torch.no_grad()
    def semantic_probs(self, rgbs: List[np.ndarray], text: torch.Tensor, resolution: int) -> List[torch.Tensor]:
        """CLIP-head mode for a batch: per image (L, H, W) class probabilities at its size."""
        if resolution % self.predictor.patch_size:
            raise EvalInputError(None, f"--resolution {resolution} is not a multiple of the patch size {self.predictor.patch_size}")
        prepped = [sam_pixels(im, resolution) for im in rgbs]
        x = self.model.preprocess(torch.stack([p[0] for p in prepped]).to(self.device), [p[1] for p in prepped])
        patches = self.predictor.forward(x, clip=False, sam=False, clip_patches=True)["clip_patches"]
        scale = self.logit_scale()
        return [postprocess_masks(class_maps(patches[b:b + 1], text, scale)[None], hw, rgb.shape[:2], resolution)[0]
                for b, (rgb, (_, hw)) in enumerate(zip(rgbs, prepped))]

    def semantic_composed(self, rgb: np.ndarray, prompts: Sequence[str], templates: str, threshold: float) -> np.ndarray:
        """Composed mode (one native-size pass, CLIP maps prompting the SAM head): (H, W) class
        indices, -1 where no class mask is positive."""
        return self.predictor.semantic_segment(rgb, list(prompts), mode="composed", threshold=threshold,
                                               templates=templates).label_map

    @torch.no_grad()
    def named_instances(self, rgb, names, prompts, background, templates="openai", points_per_side=32,
                        text_params=None, everything_params=None):
        names, extra = list(names), [b for b in background if b not in names]
        if prompts == "text":
            recs = self.predictor.segment_text(rgb, names, background=tuple(background), templates=templates,
                                               **(text_params or {}))
            return _instances(rgb, [r["segmentation"] for r in recs], [names.index(r["phrase"]) for r in recs],
                              [r["score"] for r in recs])
        recs = self.predictor.generate(rgb, labels=names + extra, templates=templates, points_per_side=points_per_side,
                                       **(everything_params or {}))
        probs = np.array([[r["label_probs"][n] for n in names + extra] for r in recs], np.float64).reshape(
            len(recs), len(names + extra))
        return _instances(rgb, *_named_masks(recs, probs, len(names)))

    @torch.no_grad()
    def box_masks(self, rgb, boxes):
        self.predictor.set_image(rgb)
        masks, _, _ = self.predictor.segment(boxes=np.asarray(boxes, np.float64), multimask_output=False)
        return masks[:, 0]


class CLIPTeacherModel(EvalModel):
    kind = "CLIP teacher"
    tasks = ("classify", "retrieval")
    why_not = {"instances": "it has no mask decoder: use --teacher sam, or --checkpoint for the merged model",
               "semantic": "zero-shot semantic segmentation here is the merged model's CLIP head: use --checkpoint"}

    def __init__(self, model_name: str, pretrained: Optional[str], device: torch.device) -> None:
        super().__init__(device)
        self.teacher = load_clip_teacher(model_name, pretrained, device=device)
        weights = pretrained
        if model_name.startswith("local-dir:"):
            folder = model_name[len("local-dir:"):]
            weights = next((os.path.join(folder, f) for f in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
                            if os.path.isfile(os.path.join(folder, f))), None)
        self.info.update({"clip_model": model_name, "clip_pretrained": pretrained,
                          "sha256": sha256_file(weights) if weights and os.path.isfile(weights) else None})

    def default_resolution(self, task: str) -> int:
        return self.teacher.image_size

    @torch.no_grad()
    def image_embeddings(self, rgbs, resolution):
        x = torch.stack([clip_pixels(im, resolution) for im in rgbs]).to(self.device)
        return _unit(self.teacher.encode_image(self.teacher.preprocess(x), normalize=True))

    def class_embeddings(self, names, templates):
        return zero_shot_classifier(self.teacher.model, self.teacher.tokenizer, names, templates, self.device)

    @torch.no_grad()
    def text_embeddings(self, texts):
        return torch.cat([self.teacher.encode_text(self.teacher.tokenize(list(texts[i:i + TEXT_BATCH])).to(self.device),
                                                   normalize=True).float() for i in range(0, len(texts), TEXT_BATCH)])

    def logit_scale(self) -> float:
        ls = getattr(self.teacher.model, "logit_scale", None)
        return float(min(ls.exp().item(), MAX_LOGIT_SCALE)) if isinstance(ls, torch.Tensor) else MAX_LOGIT_SCALE


class SAMTeacherModel(EvalModel):
    kind = "SAM teacher"
    tasks = ("instances",)
    why_not = {t: "it has no text side: use --teacher clip, or --checkpoint for the merged model"
               for t in ("classify", "retrieval")}
    why_not["semantic"] = "it has no text side: use --checkpoint for the merged model"

    def __init__(self, checkpoint: Optional[str], sam_type: str, device: torch.device, sam=None) -> None:
        super().__init__(device)
        self.sam = (sam if sam is not None else load_sam_teacher(checkpoint, sam_type)).to(device).eval()
        self.sam_predictor = SamPredictor(self.sam)
        self.native_size = int(self.sam.image_encoder.img_size)
        self.info.update({"sam_checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "sam_type": sam_type,
                          "sha256": sha256_file(checkpoint) if checkpoint else None})

    def default_resolution(self, task: str) -> int:
        return self.native_size

    @torch.no_grad()
    def box_masks(self, rgb, boxes):
        p = self.sam_predictor
        p.set_image(rgb)
        # numpy float64 mapping, then float32: SamPredictor.predict's own conversion, batched.
        t = torch.as_tensor(p.transform.apply_boxes(np.asarray(boxes, np.float64), p.original_size),
                            dtype=torch.float, device=self.device)
        masks, _, _ = p.predict_torch(None, None, boxes=t, multimask_output=False)
        return masks[:, 0].cpu().numpy()


class SAMThenCLIPModel(EvalModel):
    """Both teachers as people pair them: ``SamAutomaticMaskGenerator`` (its defaults but the grid) on the
    image, then the CLIP teacher on every mask's box crop (CLIP's eval geometry), each mask named by
    the softmax of ``logit_scale * cos`` over the class names and the background prompts."""

    kind = "SAM and CLIP teachers"
    tasks = ("instances",)

    def __init__(self, sam: SAMTeacherModel, clip: CLIPTeacherModel) -> None:
        super().__init__(sam.device)
        self.sam, self.clip = sam, clip
        self._generators: Dict[tuple, SamAutomaticMaskGenerator] = {}
        self.native_size = sam.native_size
        self.info.update({"sam": sam.info, "clip": clip.info})
        self._text: Dict[tuple, torch.Tensor] = {}

    def default_resolution(self, task: str) -> int:
        return self.native_size

    @torch.no_grad()
    def named_instances(self, rgb, names, prompts, background, templates="openai", points_per_side=32,
                        text_params=None, everything_params=None):
        texts = tuple(names) + tuple(b for b in background if b not in names)
        if (texts, templates) not in self._text:
            self._text = {(texts, templates): self.clip.class_embeddings(list(texts), templates)}
        key = (points_per_side, json.dumps(everything_params or {}, sort_keys=True))
        if key not in self._generators:
            self._generators[key] = SamAutomaticMaskGenerator(self.sam.sam, points_per_side=points_per_side,
                                                              **(everything_params or {}))
        recs = self._generators[key].generate(rgb)
        if not recs:
            return _instances(rgb, [], [], [])
        h, w = rgb.shape[:2]
        crops = []
        for r in recs:
            x, y, bw, bh = (int(round(v)) for v in r["bbox"])
            x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
            crops.append(np.ascontiguousarray(rgb[y:y + max(bh, 1), x:x + max(bw, 1)]))
        emb = self.clip.image_embeddings(crops, self.clip.teacher.image_size)
        probs = (self.clip.logit_scale() * emb @ self._text[(texts, templates)].T).softmax(-1).cpu().numpy()
        return _instances(rgb, *_named_masks(recs, probs, len(names)))


def build_model(args, device: torch.device) -> EvalModel:
    """From the command's flags: --checkpoint (merged) or --teacher sam|clip with the teacher flags."""
    if args.checkpoint and args.teacher:
        raise EvalInputError(None, "give either --checkpoint (a merged model) or --teacher sam|clip, not both")
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise EvalInputError(args.checkpoint, "merged checkpoint not found")
        return MergedModel(args.checkpoint, device, dtype=args.dtype,
                           clip_token_pool=args.clip_token_pool)
    if args.teacher == "clip":
        if not args.clip_model:
            raise EvalInputError(None, "--teacher clip needs --clip-model (an open_clip name or local-dir:FOLDER)")
        return CLIPTeacherModel(args.clip_model, args.clip_pretrained, device)
    if args.teacher == "sam":
        if not args.sam_checkpoint:
            raise EvalInputError(None, "--teacher sam needs --sam-checkpoint (an official SAM .pth)")
        if not os.path.isfile(args.sam_checkpoint):
            raise EvalInputError(args.sam_checkpoint, "SAM checkpoint not found")
        sam = SAMTeacherModel(args.sam_checkpoint, args.sam_type, device)
        if getattr(args, "prompts", "boxes") == "everything":  # named masks: SAM's generator, CLIP on the crops
            if not args.clip_model:
                raise EvalInputError(None, "--teacher sam --prompts everything names SAM's masks with the CLIP "
                                           "teacher: give --clip-model (an open_clip name or local-dir:FOLDER)")
            return SAMThenCLIPModel(sam, CLIPTeacherModel(args.clip_model, args.clip_pretrained, device))
        return sam
    raise EvalInputError(None, "give --checkpoint MERGED.safetensors, or --teacher sam|clip with the teacher flags")
