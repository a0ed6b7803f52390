"""ONNX files of the merged model, for onnxruntime, TensorRT and edge runtimes.

``encoder.onnx`` (:class:`~fastsamclip.export.encoder.ImageEncoder`): input ``image`` (B, 3, R, R)
SAM-normalised float32, outputs ``sam_embedding``, ``clip_embedding``, ``clip_patches``; the batch
is dynamic. Exported with torch's dynamo exporter (``torch.export`` then ONNX) at opset
:data:`ENCODER_OPSET`, attention on the ``reference`` backend: plain MatMul / Add / Softmax, the
arithmetic of segment_anything itself, so any runtime that has the standard operators runs it (the
fused Triton kernels are GPU code that ONNX cannot hold). Weights go into the file itself below
ONNX's 2 GB protobuf limit (ViT-B and ViT-L), into ``encoder.onnx.data`` beside it above (ViT-H).

``decoder.onnx``: segment_anything's own ONNX decoder, ``segment_anything.utils.onnx.SamOnnxModel``
wrapped around the merged model's prompt encoder and mask decoder (upstream's modules and
parameter names) and exported exactly as upstream's ``scripts/export_onnx_model.py`` does (the
TorchScript exporter, opset :data:`DECODER_OPSET`, dynamic ``num_points``), so code written for
SAM's ONNX decoder runs it unchanged: inputs ``image_embeddings`` (1, C, g, g), ``point_coords``
(1, N, 2) in the resized-image frame (original pixels * R / max(H, W)), ``point_labels`` (1, N)
(1 fg, 0 bg, 2 / 3 box corners, -1 padding), ``mask_input`` (1, 1, 4g, 4g), ``has_mask_input``
(1,), ``orig_im_size`` (2,) float (H, W); outputs ``masks`` (logits at the original size),
``iou_predictions``, ``low_res_masks``. (torch.export cannot take SamOnnxModel: its
``int(tensor)`` crop is data-dependent; the TorchScript exporter records it as upstream intended.)
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import OrderedDict
from typing import Dict, Optional

import torch
import torch.nn as nn
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from fastsamclip.export.encoder import (
    INPUT_NAME,
    MAX_BATCH,
    OUTPUT_NAMES,
    ImageEncoder,
    check_resolution,
    encoder_errors,
    errors_by_name,
    example_image,
    model_metadata,
    update_metadata,
)
from fastsamclip.kernels import use_backend
from fastsamclip.modeling import SAMCLIP

ENCODER_OPSET = 18  # the dynamo exporter's own default opset (torch 2.9+)
DECODER_OPSET = 17  # segment_anything's scripts/export_onnx_model.py default
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
# Weights above this go to an external data file (ONNX protobufs stop at 2 GiB).
INLINE_WEIGHTS_LIMIT = int(1.8 * 2**30)
# The encoder's attention: plain torch, exactly SAM's arithmetic (see the module docstring).
ONNX_ATTENTION = "reference"


class _ImageSize(nn.Module):
    """What SamOnnxModel reads of a Sam's image encoder: its input side, nothing else."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


def decoder_sam(model: SAMCLIP, resolution: Optional[int] = None) -> Sam:
    """A ``segment_anything.Sam`` sharing the merged model's prompt encoder and mask decoder (no
    copy of their weights), for SamOnnxModel. At a resolution other than the native one, the
    prompt encoder's two size attributes say so (a shallow copy: same parameters)."""
    native = int(model.config.sam.backbone.img_size)
    resolution = check_resolution(model, resolution or native)
    pe = model.prompt_encoder
    if resolution != native:
        g = resolution // int(model.config.sam.backbone.patch_size)
        pe = copy.copy(pe)
        pe.image_embedding_size = (g, g)
        pe.input_image_size = (resolution, resolution)
    return Sam(image_encoder=_ImageSize(resolution), prompt_encoder=pe, mask_decoder=model.mask_decoder,
               pixel_mean=list(model.pixel_mean), pixel_std=list(model.pixel_std)).eval()


def decoder_example(sam: Sam, num_points: int = 5, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Inputs in SamOnnxModel's order, as upstream's export script builds them."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = sam.prompt_encoder.image_embedding_size
    side = sam.image_encoder.img_size
    return OrderedDict(
        image_embeddings=torch.randn(1, sam.prompt_encoder.embed_dim, gh, gw, generator=g),
        point_coords=torch.randint(0, side, (1, num_points, 2), generator=g).float(),
        point_labels=torch.randint(0, 4, (1, num_points), generator=g).float(),
        mask_input=torch.randn(1, 1, 4 * gh, 4 * gw, generator=g),
        has_mask_input=torch.tensor([1.0]),
        orig_im_size=torch.tensor([side * 1.5, side * 2.25]).floor(),
    )


def export_decoder_module(onnx_model: SamOnnxModel, path: str, opset: int = DECODER_OPSET) -> str:
    """``scripts/export_onnx_model.py``'s export call, on any SamOnnxModel (ours or upstream's Sam)."""
    dummy = decoder_example(onnx_model.model)
    with warnings.catch_warnings():
        # The tracer warns about SamOnnxModel's int(tensor) crop and torch.tensor constants, as
        # upstream's script does (it silences the same two categories).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(onnx_model, tuple(dummy.values()), path, export_params=True, verbose=False,
                          opset_version=opset, do_constant_folding=True, input_names=list(DECODER_INPUTS),
                          output_names=list(DECODER_OUTPUTS),
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          dynamo=False)
    return path


def export_encoder(model: SAMCLIP, path: str, resolution: int, opset: int = ENCODER_OPSET) -> str:
    """``encoder.onnx`` at ``resolution`` (dynamic batch)."""
    encoder = ImageEncoder(model).eval()
    nbytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with use_backend(ONNX_ATTENTION, op="relpos_attention"), torch.no_grad():
        torch.onnx.export(encoder, (example_image(resolution).to(next(encoder.parameters()).device),), path,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset,
                          dynamo=True, dynamic_shapes={INPUT_NAME: {0: batch}}, verbose=False,
                          external_data=nbytes > INLINE_WEIGHTS_LIMIT)
    return path


def verify(model: SAMCLIP, out_dir: str, resolution: int, onnx_model: SamOnnxModel) -> Dict[str, object]:
    """Both files in onnxruntime (CPU) against the torch model on the same inputs: the max
    relative error (max |ort - torch| / max |torch|) of every output, at batch 1 and 2."""
    import onnxruntime as ort  # optional dependency (extra "export")

    enc = ort.InferenceSession(os.path.join(out_dir, ENCODER_FILE), providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    errors = encoder_errors(lambda x: enc.run(list(OUTPUT_NAMES), {INPUT_NAME: x.cpu().numpy()}),
                            model, resolution, device)
    dec = ort.InferenceSession(os.path.join(out_dir, DECODER_FILE), providers=["CPUExecutionProvider"])
    inputs = decoder_example(onnx_model.model, num_points=3, seed=1)
    inputs["point_labels"] = torch.tensor([[1.0, 0.0, -1.0]])
    with torch.no_grad():
        ref = onnx_model(*[v.to(device) for v in inputs.values()])
    got = dec.run(list(DECODER_OUTPUTS), {k: v.numpy() for k, v in inputs.items()})
    errors.update(errors_by_name(got, ref, DECODER_OUTPUTS))
    return {"onnxruntime": ort.__version__, "max_rel_err": errors}


def export_onnx(model: SAMCLIP, out_dir: str, resolution: Optional[int] = None, return_single_mask: bool = True,
                check: bool = True) -> dict:
    """``out_dir/encoder.onnx`` and ``out_dir/decoder.onnx``, and their section of ``export.json``.

    return_single_mask: the decoder's upstream option (one mask chosen by SAM's rule: the best of
    the three for one or two points (a box), the first for more; False returns all four).
    check: run both files in onnxruntime against torch and record the errors (when installed).
    Returns the section written.
    """
    model = model.eval()
    resolution = check_resolution(model, resolution or int(model.config.sam.backbone.img_size))
    os.makedirs(out_dir, exist_ok=True)
    export_encoder(model, os.path.join(out_dir, ENCODER_FILE), resolution)
    onnx_model = SamOnnxModel(decoder_sam(model, resolution), return_single_mask=return_single_mask).eval()
    export_decoder_module(onnx_model, os.path.join(out_dir, DECODER_FILE))
    section = {
        "encoder": {"file": ENCODER_FILE, "opset": ENCODER_OPSET, "exporter": "torch.export (dynamo)",
                    "attention": f"{ONNX_ATTENTION}: plain MatMul/Add/Softmax, segment_anything's arithmetic",
                    "dynamic_axes": {INPUT_NAME: {"0": "batch"}}, **model_metadata(model, resolution)},
        "decoder": {"file": DECODER_FILE, "opset": DECODER_OPSET, "exporter": "torch.onnx TorchScript "
                    "(segment_anything scripts/export_onnx_model.py)", "interface": "segment_anything SamOnnxModel",
                    "return_single_mask": return_single_mask, "inputs": list(DECODER_INPUTS),
                    "outputs": list(DECODER_OUTPUTS), "dynamic_axes": {"point_coords": {"1": "num_points"},
                                                                       "point_labels": {"1": "num_points"}}},
        "torch": torch.__version__,
    }
    if check:
        try:
            section["verified"] = verify(model, out_dir, resolution, onnx_model)
        except ImportError as e:
            section["verified"] = f"skipped: {e} (pip install onnxruntime)"
    update_metadata(out_dir, "onnx", section)
    return section

