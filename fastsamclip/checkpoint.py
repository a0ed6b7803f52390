"""The merged checkpoint: ONE safetensors file with the config and every weight.

It loads with no teacher file present: the config (JSON in the safetensors metadata) rebuilds
the architecture, including the CLIP teacher's text tower from its open_clip config. Writes are
atomic (temporary file + rename), so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastsamclip.files import atomic_write
from fastsamclip.modeling.build import SAMCLIPConfig, build_samclip
from fastsamclip.modeling.samclip import SAMCLIP
from fastsamclip.modeling.teachers import CheckpointError, check_finite, check_state_dict

FORMAT = "fastsamclip.samclip"
FORMAT_VERSION = "1"
MAKE_ONE = ("make one with `fastsamclip merge --sam-checkpoint sam_vit_b_01ec64.pth --clip-model "
            "ViT-L-14 --clip-pretrained datacomp_xl_s13b_b90k --out merged.safetensors` "
            "(or train one with `fastsamclip distill`)")


def save_merged(model: SAMCLIP, path: str) -> None:
    """Write the model (config + all weights, text tower included) to one ``.safetensors`` file."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "config": json.dumps(model.config.to_dict())}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_merged_config(path: str) -> SAMCLIPConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"merged checkpoint not found: {path}; {MAKE_ONE}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a merged fastsamclip checkpoint (not a safetensors file: {e}); {MAKE_ONE}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a merged fastsamclip checkpoint "
            f"(format {meta.get('format')!r}); {MAKE_ONE}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has merged-checkpoint format version {meta.get('format_version')!r}; this "
            f"fastsamclip reads version {FORMAT_VERSION}")
    return SAMCLIPConfig.from_dict(json.loads(meta["config"]))


def load_merged(path: str, device: Union[str, torch.device] = "cpu") -> SAMCLIP:
    """The merged model from its file, on ``device``, in eval mode."""
    cfg = read_merged_config(path)
    model = build_samclip(cfg)
    try:
        sd = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a cut or damaged file
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "the file is cut or damaged: copy or export it again") from e
    check_state_dict(model, sd, "merged", path)
    check_finite(sd, "merged", path)
    model.load_state_dict(sd)
    return model.to(device).eval()
