"""open_clip's interface on a merged checkpoint, for tools written against open_clip models.

    from fastsamclip import open_clip_compat
    model, preprocess, tokenizer = open_clip_compat.load("merged.safetensors")
    # as: model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained)
    #     tokenizer = open_clip.get_tokenizer(name)
    image = preprocess(Image.open("photo.jpg")).unsqueeze(0)
    text = tokenizer(["a photo of a cat", "a photo of a dog"])
    with torch.no_grad():
        image_features = model.encode_image(image, normalize=True)
        text_features = model.encode_text(text, normalize=True)
        probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)

``model`` is the :class:`~fastsamclip.modeling.SAMCLIP` itself (eval mode, fp32): ``encode_image``
runs the backbone and the CLIP head's pooled path on ``preprocess``'s tensors, ``encode_text`` the
CLIP teacher's text tower it carries, and ``logit_scale`` is that tower's learned log temperature.
``preprocess`` is CLIP's eval geometry (shortest side to ``resolution``, centre crop) with the
model's own normalisation, the inputs ``fastsamclip eval classify`` and ``SAMCLIPPredictor.classify``
give the head, so a tool such as clip_benchmark measures what ``fastsamclip eval`` measures (tested).
"""

from __future__ import annotations

import os
from typing import Callable, Tuple, Union

import torch

from fastsamclip.checkpoint import load_merged
from fastsamclip.modeling import SAMCLIP, CheckpointError, CLIPImageTransform

__all__ = ["load"]


def load(checkpoint: Union[str, "os.PathLike"], device=None, resolution: int = 224
         ) -> Tuple[SAMCLIP, CLIPImageTransform, Callable]:
    """(model, preprocess, tokenizer) of a merged ``.safetensors`` checkpoint.

    device: default CUDA when available, else CPU. resolution: the side ``preprocess`` crops to
    (a multiple of the patch size; 224 as CLIP, what ``fastsamclip eval classify`` uses).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = os.fspath(checkpoint)
    model = load_merged(path, device)
    if model.text is None:
        raise CheckpointError(f"{path} has no text tower (it was merged without a CLIP teacher): open_clip's "
                              "interface needs encode_text; merge again with --clip-model")
    return model, model.image_transform(resolution), model.tokenizer
