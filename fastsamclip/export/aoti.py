"""AOTInductor packages of the image encoder: one ``encoder_<R>.pt2`` per resolution.

Any side that is a multiple of the patch size, several in one call (``export_aoti(model, out,
[448, 1024])``, ``fastsamclip export --format aoti --resolution 448 1024``), all or none of them
written; every package takes a batch of 1..MAX_BATCH images.

``torch.export`` of :class:`~fastsamclip.export.encoder.ImageEncoder` (dynamic batch) compiled by
``torch._inductor.aoti_compile_and_package`` into a self-contained package: a C++ shared library
and the weights. A process that imports only torch runs it::

    runner = torch._inductor.aoti_load_package("encoder_1024.pt2")
    sam_embedding, clip_embedding, clip_patches = runner(image)   # image (B, 3, 1024, 1024)

The package is compiled for the device it was exported on (a CPU package for the CPU's
instruction set, a CUDA package for the GPU's architecture) and loads with the same torch
version. What it holds is written into the package (``runner.get_metadata()``) and beside it
(``encoder_<R>.json``): the attention path, why, the shapes and the preprocessing.

Attention. A package may hold only what Inductor compiles, plus aten. The fused Triton kernel is a
``torch.library.custom_op`` today (``fastsamclip::relpos_attention_fwd``): ``torch.export`` keeps
such an op as an opaque call that AOTInductor would run through its proxy executor, which needs
the op registered, i.e. fastsamclip imported, where the package is loaded. Registered with
``torch.library.triton_op`` instead, AOTInductor decomposes it and compiles the Triton kernel
into the package like its own. So on CUDA the candidates are tried in order, each exported,
checked to carry no fastsamclip op, compiled and compared with the eager model, the first that
passes kept: ``triton`` (only where the kernel is a triton_op), ``flex`` (FlexAttention:
a higher-order op that torch.export carries and Inductor compiles into a fused kernel), ``sdpa``
(the plain path: SDPA with the bias as attn_mask). On the CPU: ``sdpa`` (the fused kernels are GPU
code). The metadata names the one used and why each earlier one was not.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch._library import triton as torch_library_triton

from fastsamclip.export.encoder import (
    INPUT_NAME,
    MAX_BATCH,
    METADATA_FILE,
    OUTPUT_NAMES,
    ImageEncoder,
    check_resolution,
    encoder_errors,
    example_image,
    model_metadata,
    update_metadata,
)
from fastsamclip.files import staged_folder, write_json
from fastsamclip.kernels import OPS, use_backend
from fastsamclip.modeling import SAMCLIP

# The fused kernel's torch.library name (kernels/relpos_attention_triton.py registers it).
FUSED_OP = "fastsamclip::relpos_attention_fwd"
# Namespaces a package may call: aten and prims compile; anything else must be registered where it loads.
PORTABLE_NAMESPACES = ("aten", "prims")
# A package whose outputs differ from the eager model's by more than this is not kept (fp32;
# Inductor reorders reductions, measured ~1e-6 on the CPU).
PACKAGE_RTOL = 1e-4


def package_name(resolution: int) -> str:
    return f"encoder_{resolution}.pt2"


def is_triton_op(name: str) -> bool:
    """Whether ``name`` was registered with ``torch.library.triton_op`` (Inductor can see its
    kernels). torch has no public query: triton_op records every op it registers, with its
    kernels, in ``torch._library.triton.triton_ops_to_kernels`` (torch 2.6 to 2.14); custom_op
    does not."""
    return name in getattr(torch_library_triton, "triton_ops_to_kernels", {})


def attention_candidates(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """(backends to try in order, why each backend left out was left out)."""
    if device.type != "cuda":
        return ["sdpa"], {"triton": "the fused kernels are GPU code; on the CPU the plain path runs"}
    skipped: Dict[str, str] = {}
    candidates: List[str] = []
    op = OPS["relpos_attention"]
    why = op["triton"].is_available()
    if why:
        skipped["triton"] = why
    elif not is_triton_op(FUSED_OP):
        skipped["triton"] = (f"{FUSED_OP} is a torch.library.custom_op: AOTInductor would call it through its "
                             "proxy executor, which needs fastsamclip imported where the package loads; "
                             "registered with torch.library.triton_op, Inductor compiles it into the package")
    else:
        candidates.append("triton")
    why = op["flex"].is_available()
    if why:
        skipped["flex"] = why
    else:
        candidates.append("flex")
    return candidates + ["sdpa"], skipped


def foreign_ops(program: torch.export.ExportedProgram) -> List[str]:
    """Ops of the exported graph outside aten/prims (each would need its library where the
    package loads), by name."""
    names = set()
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if target.namespace not in PORTABLE_NAMESPACES:
                names.add(f"{target.namespace}::{target._opname}")
    return sorted(names)


def export_program(model: SAMCLIP, resolution: int, device: torch.device, attention: str
                   ) -> torch.export.ExportedProgram:
    """``torch.export`` of the encoder with ``attention`` forced, batch dynamic in 1..MAX_BATCH."""
    encoder = ImageEncoder(model.to(device).eval())
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with use_backend(attention, op="relpos_attention"), torch.no_grad():
        return torch.export.export(encoder, (example_image(resolution, device=device),),
                                   dynamic_shapes={INPUT_NAME: {0: batch}})


def check_package(path: str, model: SAMCLIP, resolution: int, device: torch.device,
                  batch_sizes: Sequence[int] = (1, 2)) -> Dict[str, float]:
    """Load ``path`` and compare it with the eager model (automatic attention backend) on the
    same inputs: max relative error per output over ``batch_sizes``."""
    return encoder_errors(torch._inductor.aoti_load_package(path), model, resolution, device, batch_sizes)


def compile_package(model: SAMCLIP, folder: str, resolution: int, device: torch.device,
                    inductor_configs: Optional[dict] = None, check: bool = True) -> dict:
    """``folder/encoder_<R>.pt2`` and ``encoder_<R>.json`` at one resolution: the attention
    candidates tried in order, the first that exports, carries no fastsamclip op and (checked)
    equals the eager model kept. Returns its metadata."""
    path = os.path.join(folder, package_name(resolution))
    candidates, not_used = attention_candidates(device)
    meta = {"format": "aoti", "file": os.path.basename(path), "device": device.type,
            "torch": torch.__version__, "dynamic_axes": {INPUT_NAME: {"0": "batch"}}, "max_batch": MAX_BATCH,
            "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES), **model_metadata(model, resolution)}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    for i, attention in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            program = export_program(model, resolution, device, attention)
            foreign = foreign_ops(program)
            if foreign:
                raise RuntimeError(f"the exported graph calls {foreign}, which a package cannot carry")
            info = dict(meta, attention=attention, attention_not_used=dict(not_used))
            configs = {"aot_inductor.metadata": {k: str(v) for k, v in info.items()}, **(inductor_configs or {})}
            torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)
            if check or len(candidates) > 1:
                errors = check_package(path, model, resolution, device)
                worst = max(errors.values())
                if worst > PACKAGE_RTOL:
                    raise RuntimeError(f"the package differs from the eager model: max relative error {worst:.2e}")
                info["verified"] = {"against": "eager model, same inputs, batch 1 and 2", "max_rel_err": errors}
            break
        except Exception as e:  # noqa: BLE001 -- a failed candidate is recorded and the next one tried
            if last:
                raise
            not_used[attention] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    write_json(path.replace(".pt2", ".json"), info)
    return info


def export_aoti(model: SAMCLIP, out_dir: str, resolutions: Union[int, Sequence[int], None] = None, device=None,
                inductor_configs: Optional[dict] = None, check: bool = True,
                progress: Optional[Callable[[str], None]] = None) -> Dict[int, dict]:
    """``out_dir/encoder_<R>.pt2`` (+ ``encoder_<R>.json``) for each of ``resolutions`` (one side
    or several, multiples of the patch size; default the native size) on ``device`` (default:
    CUDA when available, else CPU), each with a dynamic batch of 1..MAX_BATCH; returns the
    metadata of each by resolution. The model is moved to ``device``.

    All or nothing: the packages are compiled into a folder beside ``out_dir`` (``staged_folder``)
    and moved in, with ``export.json``, once every one of them has passed, so a failed export
    leaves ``out_dir`` as it was (not created, when it did not exist).
    inductor_configs: extra Inductor options (e.g. ``{"max_autotune": True}``). check: compare
    each package with the eager model (always done when there is more than one attention
    candidate, since that is how a candidate is accepted). progress: called with one line as each
    package is started and done (a compile takes minutes at ViT-B size).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolutions is None:
        resolutions = [int(model.config.sam.backbone.img_size)]
    elif isinstance(resolutions, int):
        resolutions = [resolutions]
    sizes = list(dict.fromkeys(check_resolution(model, int(r)) for r in resolutions))
    infos: Dict[int, dict] = {}
    with staged_folder(out_dir) as stage:
        for res in sizes:
            if progress:
                progress(f"{package_name(res)}: exporting and compiling for {device.type} ...")
            t = time.perf_counter()
            infos[res] = compile_package(model, stage, res, device, inductor_configs, check)
            if progress:
                progress(f"{package_name(res)}: attention {infos[res]['attention']}, {time.perf_counter() - t:.0f} s")
        existing = os.path.join(out_dir, METADATA_FILE)
        if os.path.isfile(existing):  # its other sections are kept
            shutil.copy2(existing, os.path.join(stage, METADATA_FILE))
        update_metadata(stage, "aoti", {str(res): info for res, info in infos.items()})
    return infos
