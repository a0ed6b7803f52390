"""Exports of the merged model for runtimes without its code.

- :func:`export_onnx`: ``encoder.onnx`` (one pass, both heads, dynamic batch) and ``decoder.onnx``
  (segment_anything's ONNX decoder interface), for onnxruntime, TensorRT and edge runtimes;
- :func:`export_aoti`: ``encoder_<R>.pt2``, an AOTInductor package per resolution that
  ``torch._inductor.aoti_load_package`` runs in a process that imports only torch;
- :func:`export_text_embeddings`: a label set's class embeddings in one ``.npz``, so an edge
  application classifies without the text tower or a tokenizer.

Every export writes its section of ``export.json`` in the output folder: file names, opsets,
shapes, the preprocessing, the attention path, and the errors measured against the torch model.
"""

from fastsamclip.export.aoti import export_aoti, foreign_ops, package_name
from fastsamclip.export.encoder import METADATA_FILE, OUTPUT_NAMES, ImageEncoder, max_rel_err, update_metadata
from fastsamclip.export.labels import LABELS_FILE, export_text_embeddings, load_text_embeddings, zero_shot_probs
from fastsamclip.export.onnx_files import (
    DECODER_FILE,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    decoder_sam,
    export_decoder_module,
    export_onnx,
)

__all__ = [
    "DECODER_FILE", "DECODER_INPUTS", "DECODER_OUTPUTS", "ENCODER_FILE", "LABELS_FILE", "METADATA_FILE",
    "OUTPUT_NAMES", "ImageEncoder", "decoder_sam", "export_aoti", "export_decoder_module", "export_onnx",
    "export_text_embeddings", "foreign_ops", "load_text_embeddings", "max_rel_err", "package_name",
    "update_metadata", "zero_shot_probs",
]
