"""The paper's reported numbers, as data, so every table prints them beside the run's.

Source: the tables of the SAM-CLIP paper (``CITATION``); metric keys are this harness's keys.
A row applies to a run when its ``setting`` entries equal the run's (a row without a
``resolution`` entry applies at any resolution: the paper does not state one there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

CITATION = ("H. Wang et al., \"SAM-CLIP: Merging Vision Foundation Models towards Semantic and Spatial "
            "Understanding\", arXiv:2310.15308 v4 (CVPR 2024 workshops)")

SAMCLIP = "SAM-CLIP ViT-B/16"
CLIP_REF = "CLIP ViT-B/16 DataComp-1B"  # the paper's CLIP reference row
SAM_REF = "SAM ViT-B"


@dataclass(frozen=True)
class PaperRow:
    task: str
    dataset: str
    model: str
    metrics: Dict[str, float]
    setting: Dict[str, object] = field(default_factory=dict)  # must equal the run's entries
    notes: Tuple[Tuple[Tuple[str, object], str], ...] = ()  # ((setting key, value or "*"), note) pairs

    def applies(self, setting: Dict[str, object]) -> bool:
        return all(setting.get(k) == v for k, v in self.setting.items())

    def notes_for(self, setting: Dict[str, object]) -> List[str]:
        return [text for (k, v), text in self.notes if v == "*" or setting.get(k) == v]


_UNSTATED_RES = (("resolution", "*"), "the paper does not state the input resolution of this number.")
_GT_BOXES = (("boxes", "ground truth"), "the paper prompts with ViTDet-B detections; ground-truth boxes give higher "
                                         "numbers, so this run is not comparable to the paper's column.")
_RETRIEVAL = (("resolution", "*"), "the paper gives one R@1 per dataset without its direction; it is shown beside the "
                                   "mean of image-to-text and text-to-image R@1 (the retrieval metric of DataComp's "
                                   "evaluation suite, 'mean_recall@1').")

PAPER: Tuple[PaperRow, ...] = (
    # Zero-shot classification (top-1, %).
    PaperRow("classify", "imagenet", SAMCLIP, {"top1": 71.7}, {"resolution": 224}),
    PaperRow("classify", "imagenet", SAMCLIP, {"top1": 72.4}, {"resolution": 336}),
    PaperRow("classify", "imagenet", CLIP_REF, {"top1": 73.5}, notes=(_UNSTATED_RES,)),
    PaperRow("classify", "imagenet-v2", SAMCLIP, {"top1": 63.2}, notes=(_UNSTATED_RES,)),
    PaperRow("classify", "imagenet-v2", CLIP_REF, {"top1": 65.6}),
    PaperRow("classify", "places365", SAMCLIP, {"top1": 43.6}, notes=(_UNSTATED_RES,)),
    PaperRow("classify", "places365", CLIP_REF, {"top1": 43.0}),
    # Zero-shot retrieval (R@1, %).
    PaperRow("retrieval", "flickr30k", SAMCLIP, {"R@1": 79.2}, notes=(_RETRIEVAL,)),
    PaperRow("retrieval", "coco", SAMCLIP, {"R@1": 49.3}, notes=(_RETRIEVAL,)),
    # Box-prompted instance segmentation (mask AP, %), ViTDet-B boxes as prompts.
    PaperRow("instances", "coco", SAMCLIP, {"AP": 40.9}, {"prompts": "boxes"}, notes=(_GT_BOXES,)),
    PaperRow("instances", "coco", SAM_REF, {"AP": 41.2}, {"prompts": "boxes"}),
    PaperRow("instances", "lvis", SAMCLIP, {"AP": 35.0}, {"prompts": "boxes"}, notes=(_GT_BOXES,)),
    PaperRow("instances", "lvis", SAM_REF, {"AP": 36.8}, {"prompts": "boxes"}),
    # Zero-shot semantic segmentation (mIoU, %): CLIP head at 448 px; both heads on VOC.
    PaperRow("semantic", "voc", SAMCLIP, {"mIoU": 60.6}, {"mode": "clip", "resolution": 448}),
    PaperRow("semantic", "pascal-context", SAMCLIP, {"mIoU": 29.2}, {"mode": "clip", "resolution": 448}),
    PaperRow("semantic", "ade20k", SAMCLIP, {"mIoU": 17.1}, {"mode": "clip", "resolution": 448}),
    PaperRow("semantic", "coco-stuff", SAMCLIP, {"mIoU": 31.5}, {"mode": "clip", "resolution": 448}),
    PaperRow("semantic", "coco-panoptic", SAMCLIP, {"mIoU": 28.8}, {"mode": "clip", "resolution": 448}),
    PaperRow("semantic", "voc", SAMCLIP, {"mIoU": 66.0}, {"mode": "composed"}),
)


def paper_rows(task: str, dataset: str, setting: Dict[str, object]) -> List[PaperRow]:
    return [p for p in PAPER if p.task == task and p.dataset == dataset and p.applies(setting)]
