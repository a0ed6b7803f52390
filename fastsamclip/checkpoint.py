"""The merged checkpoint: ONE safetensors file with the config and every weight.

It loads with no teacher file present: the config (JSON in the safetensors metadata) rebuilds
the architecture, including the CLIP teacher's text tower from its open_clip config. Writes are
atomic (temporary file + rename), so an interrupted save never leaves a half-written file.

Integrity record: the metadata holds the sha256 of every tensor's bytes (``sha256``, written by
:func:`save_merged`, so by ``merge``, ``distill`` and the demo) and where the teachers came from
(``teachers``). :func:`load_merged` checks every tensor against its digest and refuses a file whose
bytes changed after it was written (a flipped bit, a bad copy), naming the tensor: a damaged
weight would otherwise load and give other masks and labels without a word. The check reads each
tensor once (sha256 runs at ~1.7 GB/s with SHA-NI: measured on the README's ViT-B-sized file);
a file with a valid record skips the NaN/Infinity scan, since :func:`save_merged` refuses to write
non-finite weights. Checkpoints written before the record load with one warning per file and the
NaN/Infinity scan only (choice: keep them usable rather than refuse them).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastsamclip.files import atomic_write, sha256_bytes
from fastsamclip.modeling.build import SAMCLIPConfig, build_samclip
from fastsamclip.modeling.samclip import SAMCLIP
from fastsamclip.modeling.teachers import CheckpointError, check_finite, check_state_dict

FORMAT = "fastsamclip.samclip"
FORMAT_VERSION = "1"
MAKE_ONE = ("make one with `fastsamclip merge --sam-checkpoint sam_vit_b_01ec64.pth --clip-model "
            "ViT-L-14 --clip-pretrained datacomp_xl_s13b_b90k --out merged.safetensors` "
            "(or train one with `fastsamclip distill`)")
DIGEST_KEY = "sha256"  # metadata: JSON {tensor name: sha256 of its bytes}
TEACHERS_KEY = "teachers"  # metadata: JSON {"sam": source, "clip": source, "random_teachers": bool}

log = logging.getLogger("fastsamclip.checkpoint")
_warned_unrecorded = set()  # files already warned about in this process


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return sha256_bytes(t.view(torch.uint8).numpy() if t.numel() else b"")


def save_merged(model: SAMCLIP, path: str, teachers: Optional[Dict[str, object]] = None) -> None:
    """Write the model (config + all weights, text tower included) to one ``.safetensors`` file,
    with its integrity record; ``teachers``: where the teachers came from, recorded beside it.
    Weights holding NaN or Infinity are refused (a file is never written that would answer NaN)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to write {path}: tensor {name} holds {int((~torch.isfinite(t)).sum())} "
                                  f"NaN/Infinity value(s) of {t.numel()}; the model is unusable (a diverged run?)")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "config": json.dumps(model.config.to_dict()),
                DIGEST_KEY: json.dumps({k: tensor_digest(v) for k, v in tensors.items()})}
    if teachers is not None:
        metadata[TEACHERS_KEY] = json.dumps(teachers)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_merged_metadata(path: str) -> Dict[str, str]:
    """The file's safetensors metadata, checked to be a merged checkpoint of a version this reads."""
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
    return meta


def read_merged_config(path: str) -> SAMCLIPConfig:
    return SAMCLIPConfig.from_dict(json.loads(read_merged_metadata(path)["config"]))


def read_teachers(path: str) -> Optional[dict]:
    """Where the file's teachers came from (``None`` for files written without the record)."""
    text = read_merged_metadata(path).get(TEACHERS_KEY)
    return None if text is None else json.loads(text)


def verify_integrity(state_dict: Dict[str, torch.Tensor], meta: Dict[str, str], path: str) -> None:
    """Every tensor against its recorded digest (a ``CheckpointError`` naming the first that
    differs); without a record, one warning per file and the NaN/Infinity scan."""
    record = meta.get(DIGEST_KEY)
    if record is None:
        if path not in _warned_unrecorded:
            _warned_unrecorded.add(path)
            log.warning("%s has no integrity record (written before fastsamclip recorded one): its weights are "
                        "checked for NaN/Infinity only; load it and save it again with "
                        "fastsamclip.checkpoint.save_merged to add one", path)
        check_finite(state_dict, "merged", path)
        return
    try:
        digests = json.loads(record)
    except ValueError as e:
        raise CheckpointError(f"{path}: its integrity record is not readable ({e}); the file is damaged: copy, "
                              "export or train it again") from None
    for name, t in state_dict.items():
        if name not in digests or tensor_digest(t) != digests[name]:
            raise CheckpointError(f"{path}: tensor {name} does not match the file's integrity record (sha256); the "
                                  "file changed after it was written (a damaged disk or copy): copy, export or "
                                  "train it again")


def load_merged(path: str, device: Union[str, torch.device] = "cpu") -> SAMCLIP:
    """The merged model from its file, on ``device``, in eval mode (integrity checked first)."""
    meta = read_merged_metadata(path)
    model = build_samclip(SAMCLIPConfig.from_dict(json.loads(meta["config"])))
    try:
        sd = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a cut or damaged file
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "the file is cut or damaged: copy or export it again") from e
    check_state_dict(model, sd, "merged", path)
    verify_integrity(sd, meta, path)
    model.load_state_dict(sd)
    return model.to(device).eval()
