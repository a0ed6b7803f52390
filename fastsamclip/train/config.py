"""The training configuration: every number of the recipe, each overridable by flag or file.

Paper defaults for every field the paper states (DESIGN: the recipe); the others are marked
"paper: not stated" with the choice made. ``fastsamclip distill --help`` lists the fields with
these comments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from fastsamclip.errors import ConfigError, check_range

# fastsamclip.data.decode.DECODERS, written out so that the configuration (which the command line's
# parser reads) imports no torch; tests/data/test_decode.py checks the two agree.
DECODERS = ("auto", "cpu", "cuda")

STAGES = (1, 2, 3)


@dataclass
class TrainConfig:
    # --- teachers and data
    sam_checkpoint: Optional[str] = None  # official SAM .pth (sam_vit_b_01ec64.pth); required unless random_teachers
    sam_type: str = "vit_b"  # vit_b | vit_l | vit_h (vit_tiny / vit_micro for tests and the demo)
    clip_model: str = "ViT-L-14"  # open_clip model name or local-dir:/folder (paper: OpenCLIP ViT-L/14)
    clip_pretrained: Optional[str] = None  # open_clip tag (paper: datacomp_xl_s13b_b90k) or a local file; a local-dir: model carries its own
    random_teachers: bool = False  # allow teachers without weights (random initialisation): smoke tests only
    clip_data: str = ""  # D_CLIP: WebDataset shard spec ('/d/{00000..00099}.tar') or an image folder
    sam_data: str = ""  # D_SAM: SA-1B folder of sa_N.jpg + sa_N.json
    out: str = "samclip-out"  # output folder: checkpoints, metrics, report, merged model
    overwrite: bool = False  # start over in an out folder that holds a run (its metrics and checkpoints go)
    init_from: Optional[str] = None  # start from a merged checkpoint instead of fresh from the teachers
    teacher_cache: Optional[str] = None  # folder made by cache_teachers; None: live teachers only
    head_hidden: Optional[int] = None  # CLIP head MLP width; None: the backbone width
    # --- stage lengths: epochs over D_CLIP (paper 20 / 16 / 3); a positive *_steps overrides
    stage1_epochs: float = 20.0  # head probing
    stage2_epochs: float = 16.0  # multi-task distillation (paper early-stopped at 16)
    stage3_epochs: float = 3.0  # resolution adaptation
    stage1_steps: int = 0  # optimizer steps of stage 1; 0: from stage1_epochs
    stage2_steps: int = 0
    stage3_steps: int = 0
    # --- batches (global over all ranks; each rank takes 1/world_size)
    clip_batch: int = 2048  # D_CLIP images per step at clip_base_res (paper: 2048)
    clip_base_res: int = 224  # resolution at which the CLIP batch is clip_batch; ~constant pixels otherwise
    clip_resolutions: Tuple[int, ...] = (224, 448)  # CLIP-stream sides drawn per batch in stages 1-2
    stage3_resolutions: Tuple[int, ...] = (224, 448, 1024)  # CLIP-stream sides in stage 3
    stage3_token_pools: Tuple[int, ...] = (2,)  # stage 3 also trains the CLIP head on the trunk tokens pooled k x k (the cheap path at 1024 px), loss averaged over the paths (paper: full tokens only); (): paper only
    sam_batch: int = 32  # SA-1B images per step (paper: 32)
    masks_per_image: int = 32  # masks (prompts) per SA-1B image (paper: 32)
    prompt_types: Tuple[str, ...] = ("box", "point")  # prompts used; with both, half the masks each
    clip_micro_batch: int = 0  # per-rank images per fwd/bwd pass (gradient accumulation); 0: all at once
    sam_micro_batch: int = 0  # per-rank SA-1B images per fwd/bwd pass; 0: all at once
    sam_image_size: int = 0  # SAM-stream input side; 0: the backbone's native size (1024 for vit_b)
    # --- optimisation
    stage1_lr: float = 8e-4  # AdamW lr of the CLIP head in stage 1 (paper)
    stage2_lr: float = 4e-5  # CLIP head lr in stage 2 (paper)
    stage2_lr_scale: float = 0.1  # backbone and mask decoder lr = stage2_lr * this (paper: 4e-6)
    stage3_lr: float = 8e-4  # CLIP head lr in stage 3 (paper)
    weight_decay: float = 0.05  # on weight matrices only (paper: not stated)
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas (paper: not stated; torch defaults)
    warmup_fraction: float = 0.05  # linear warm-up over this fraction of each stage (paper: not stated)
    min_lr_ratio: float = 0.0  # cosine decays to lr * this
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    sam_loss_weight: float = 10.0  # lambda of L_CLIP + lambda * L_SAM (paper: 10)
    focal_weight: float = 20.0  # focal : dice = 20 : 1, SAM's own mask loss weights
    dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_backend: Optional[str] = None  # force the loss kernels: "triton" | "reference"; None: automatic
    # --- engineering
    seed: int = 0  # seeds data order, prompt draws, resolution draws and the global RNGs
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    amp: str = "auto"  # bf16 | off | auto (bf16 autocast on CUDA, off on CPU)
    compile: bool = False  # torch.compile the image encoder and CLIP head (per-resolution graphs)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" to debug a compiled run)
    activation_checkpointing: bool = False  # recompute backbone blocks in backward (1024 px batches)
    num_workers: int = -1  # DataLoader workers per rank decoding D_CLIP (shards or folder) and SA-1B; 0: in-process; -1: auto (on CUDA the rank's share of the CPUs less one, on the CPU 0)
    checkpoint_every: int = 1000  # write out/checkpoints/last.pt every K optimizer steps (and at stage ends)
    keep_stage_checkpoints: bool = True  # also keep stage{N}.pt at the end of each stage
    resume: bool = False  # continue from out/checkpoints/last.pt
    max_nan_skips: int = 20  # stop the run after this many skipped non-finite steps
    log_every: int = 10  # metrics.jsonl / TensorBoard every N steps
    progress: bool = True  # tqdm bar with img/s and losses (rank 0)
    tensorboard: bool = True  # TensorBoard scalars in out/tb when tensorboard is installed
    clip_holdout: float = 0.01  # fraction of D_CLIP held out, chosen by a hash of each sample's identity (paper: 1%)
    eval_clip_images: int = 256  # held-out D_CLIP images in the report (the first ones in shard/file order); 0: all
    eval_images: int = 0  # held-out SA-1B images for the report's mask agreement; 0: 1% (at least 1)
    eval_resolutions: Tuple[int, ...] = ()  # CLIP cosine reported at these sides; (): stage-3 ones
    eval_masks_per_image: int = 8  # prompts per held-out image for the mask IoU
    prefetch_batches: int = 2  # batches each DataLoader worker prepares ahead (pinned memory on CUDA)
    clip_decode: str = "auto"  # D_CLIP JPEG decoding: cpu (PIL, draft mode, in the workers) | cuda (nvJPEG, shards) | auto (on CUDA the faster of the two on the run's own images, measured at start; a teacher cache's own choice when one is given)

    def validate(self) -> None:
        """Every number range-checked (a NaN learning rate, a negative step count, a weight that
        trains backwards are refused here, naming the option), then the rules between fields."""
        for name, (lo, hi, lo_open, hi_open) in RANGES.items():
            if not name.endswith("[]"):
                _check_range(name, getattr(self, name), lo, hi, lo_open, hi_open)
        for name in ("clip_resolutions", "stage3_resolutions", "eval_resolutions", "betas"):
            lo, hi, lo_open, hi_open = RANGES.get(name + "[]", (None, None, False, False))
            for v in getattr(self, name):
                _check_range(name, v, lo, hi, lo_open, hi_open)
        if self.head_hidden is not None:
            _check_range("head_hidden", self.head_hidden, 1, None, False, False)
        if len(self.betas) != 2:
            raise ConfigError(f"betas (--betas) {tuple(self.betas)}: expected two numbers, e.g. 0.9,0.999")
        if self.focal_weight == 0 and self.dice_weight == 0:
            raise ConfigError("focal_weight and dice_weight are both 0: L_SAM would be 0; keep SAM's 20,1")
        if not set(self.prompt_types) <= {"box", "point"} or not self.prompt_types:
            raise ConfigError(f"prompt_types must be a non-empty subset of ('box', 'point'), got {self.prompt_types}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        bad = [k for k in self.stage3_token_pools if k < 2]
        if bad:
            raise ConfigError(f"stage3_token_pools {tuple(self.stage3_token_pools)}: each factor pools k x k tokens and "
                              "must be >= 2 (the full-token path is always trained); () trains the paper's path only")
        if self.clip_decode not in DECODERS:
            raise ConfigError(f"clip_decode must be one of {', '.join(DECODERS)}, got {self.clip_decode!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite starts it over: give one of them")

    def teacher_weights(self) -> dict:
        """Where each teacher's weights come from, or a ConfigError when one has none and
        ``random_teachers`` is off (training against a random teacher distils noise)."""
        clip_own = self.clip_model.startswith(("local-dir:", "hf-hub:"))  # the folder/repo holds the weights
        sources = {"sam": self.sam_checkpoint, "clip": self.clip_pretrained or (self.clip_model if clip_own else None)}
        missing = [k for k, v in sources.items() if v is None]
        if missing and not self.random_teachers:
            hints = {"sam": "--sam-checkpoint sam_vit_b_01ec64.pth (an official SAM .pth)",
                     "clip": "--clip-pretrained datacomp_xl_s13b_b90k (an open_clip tag) or a local weights file"}
            raise ConfigError(f"no weights for the {' and '.join(f'{k.upper()} teacher' for k in missing)}: pass "
                              + " and ".join(hints[k] for k in missing)
                              + "; --random-teachers uses randomly initialised teachers instead (smoke tests only)")
        return {k: (v if v is not None else "random") for k, v in sources.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# (low, high, low open, high open) of every numeric field; None: unbounded on that side. Each
# bound is what the field can mean: a learning rate is > 0 (0 trains nothing, < 0 trains
# backwards), a count is >= 0 or >= 1, a fraction is in its interval. NaN fails every bound.
RANGES = {
    "stage1_epochs": (0, None, False, False), "stage2_epochs": (0, None, False, False),
    "stage3_epochs": (0, None, False, False),
    "stage1_steps": (0, None, False, False), "stage2_steps": (0, None, False, False),
    "stage3_steps": (0, None, False, False),
    "clip_batch": (1, None, False, False), "clip_base_res": (1, None, False, False),
    "sam_batch": (1, None, False, False), "masks_per_image": (1, None, False, False),
    "clip_micro_batch": (0, None, False, False), "sam_micro_batch": (0, None, False, False),
    "sam_image_size": (0, None, False, False),
    "stage1_lr": (0, None, True, False), "stage2_lr": (0, None, True, False), "stage3_lr": (0, None, True, False),
    "stage2_lr_scale": (0, None, False, False), "weight_decay": (0, None, False, False),
    "warmup_fraction": (0, 1, False, True), "min_lr_ratio": (0, 1, False, False), "grad_clip": (0, None, False, False),
    "sam_loss_weight": (0, None, False, False), "focal_weight": (0, None, False, False),
    "dice_weight": (0, None, False, False), "focal_alpha": (0, 1, False, False), "focal_gamma": (0, None, False, False),
    "seed": (0, 2**32 - 1, False, False), "num_workers": (-1, None, False, False),  # -1: auto
    "checkpoint_every": (0, None, False, False), "max_nan_skips": (0, None, False, False),
    "log_every": (1, None, False, False), "clip_holdout": (0, 0.5, True, True),
    "eval_clip_images": (0, None, False, False), "eval_images": (0, None, False, False),
    "eval_masks_per_image": (1, None, False, False), "prefetch_batches": (1, None, False, False),
    "clip_resolutions[]": (1, None, False, False), "stage3_resolutions[]": (1, None, False, False),
    "eval_resolutions[]": (1, None, False, False), "betas[]": (0, 1, False, True),
}


def _check_range(name: str, v, lo, hi, lo_open: bool, hi_open: bool) -> None:
    check_range(f"{name} (--{name.replace('_', '-')})", v, lo, hi, lo_open, hi_open, error=ConfigError)


def _coerce(f: dataclasses.Field, value):
    """A value from JSON/YAML or the command line into the field's type (annotations are strings);
    a ConfigError naming the option (and its flag) when it is not of that type."""
    try:
        return _convert(f, value)
    except (TypeError, ValueError) as e:
        t = str(f.type)
        kind = ("comma-separated values" if t.startswith("Tuple") else "true or false" if t == "bool"
                else "an integer" if "int" in t else "a number" if "float" in t else "a string")
        raise ConfigError(f"{f.name} (--{f.name.replace('_', '-')}) {value!r}: expected {kind}") from e


def _convert(f: dataclasses.Field, value):
    t = str(f.type)
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("none", "null") and t.startswith("Optional"):
        return None
    if t.startswith("Tuple"):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        inner = float if "float" in t else int if "int" in t else str
        return tuple(inner(v) for v in value)
    if t == "bool":
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("not a boolean")
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if "int" in t:
        return int(value)
    if "float" in t:
        return float(value)
    return str(value)


def config_from_dict(d: dict, base: Optional[TrainConfig] = None) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; known: {', '.join(fields)}")
    cfg = dataclasses.replace(base or TrainConfig(), **{k: _coerce(fields[k], v) for k, v in d.items()})
    cfg.validate()
    return cfg


def load_config_file(path: str) -> dict:
    """A JSON or YAML file of TrainConfig fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # optional: PyYAML, only for YAML config files
        except ImportError as e:
            raise ImportError("reading a YAML config needs PyYAML (pip install pyyaml), or write it as JSON") from e
        d = yaml.safe_load(text) or {}
    else:
        d = json.loads(text)
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return d

