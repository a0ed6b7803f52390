"""Image passes kept by the model workers, so that an image costs ONE backbone pass whatever is
asked of it afterwards (the page's hovers, clicks, boxes, "everything", the semantic map).

``POST /v1/image`` runs the pass and keeps it under the image's id (the sha256 of its bytes); a
later ``segment``, ``everything``, ``concepts`` or composed ``semantic`` request that names
``image_id`` instead of sending ``image`` runs only its head on it. Each worker holds the last ``size``
passes in memory (least recently used out first). With several workers (``--workers-per-device``,
``--devices``) a request may reach any of them, so each pass is also written to a folder the
workers share (``shared``: created and removed by the server's main process, in ``/dev/shm``
where there is one): a worker that misses in memory reads it from there, once. The folder
holds at most ``size`` passes too (the least recently kept out first). Files are written whole (a
temporary file renamed into place), so no worker ever reads half a pass.

A pass is what ``SAMCLIPPredictor.set_pass`` takes: ``sam`` (1, C, g, g), ``clip`` (1, E),
``clip_patches`` (1, g, g, E), the image's ``original_size`` and ``input_size``, and the RGB
image itself (the generator's crop layers crop it).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsamclip.files import atomic_write

PASS_KEYS = ("sam", "clip", "clip_patches")
SUFFIX = ".safetensors"


def _written(path: str) -> Tuple[int, str]:
    """(when the file was written, in ns, or 0 when another worker removed it meanwhile, path)."""
    try:
        return os.stat(path).st_mtime_ns, path
    except FileNotFoundError:
        return 0, path


class ImagePass:
    """One image's backbone outputs (on the worker's device) and sizes."""

    def __init__(self, out: Dict[str, torch.Tensor], original_size: Tuple[int, int], input_size: Tuple[int, int],
                 image: np.ndarray) -> None:
        self.out = {k: out[k] for k in PASS_KEYS}
        self.original_size, self.input_size, self.image = tuple(original_size), tuple(input_size), image


def is_image_id(value: str) -> bool:
    """An id as :class:`PassCache` makes them: lowercase hex (a file name in the shared folder)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and all(c in "0123456789abcdef" for c in value)


class PassCache:
    """The last ``size`` image passes of a worker, and the folder the workers share (or None)."""

    def __init__(self, size: int, device: torch.device, shared: Optional[str] = None) -> None:
        self.size, self.device, self.shared = size, device, shared
        self._memory: "OrderedDict[str, ImagePass]" = OrderedDict()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._memory or (self.shared is not None and os.path.exists(self._path(image_id)))

    def _path(self, image_id: str) -> str:
        return os.path.join(self.shared, image_id + SUFFIX)

    def put(self, image_id: str, item: ImagePass) -> None:
        self._remember(image_id, item)
        if self.shared is None:
            return
        if not os.path.exists(self._path(image_id)):  # else kept already: only its time moves, below
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in item.out.items()}
            tensors["image"] = torch.from_numpy(np.ascontiguousarray(item.image))
            meta = {"original_size": json.dumps(item.original_size), "input_size": json.dumps(item.input_size)}
            atomic_write(self._path(image_id), lambda tmp: save_file(tensors, tmp, metadata=meta))
        try:  # the eviction's order: the clock's nanoseconds (a file system may stamp coarser than writes follow)
            now = time.time_ns()
            os.utime(self._path(image_id), ns=(now, now))
        except FileNotFoundError:  # evicted by another worker meanwhile
            return
        files = sorted((t, f) for t, f in map(_written, glob.glob(os.path.join(self.shared, "*" + SUFFIX))) if t)
        for _, old in files[:max(0, len(files) - self.size)]:
            try:
                os.remove(old)
            except FileNotFoundError:  # another worker removed it first
                pass

    def get(self, image_id: str) -> Optional[ImagePass]:
        """The pass, or None when neither this worker nor the shared folder has it."""
        if image_id in self._memory:
            self._memory.move_to_end(image_id)
            return self._memory[image_id]
        if self.shared is None:
            return None
        try:
            with safe_open(self._path(image_id), "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in (*PASS_KEYS, "image")}
        except FileNotFoundError:  # never written, or evicted by a worker meanwhile
            return None
        item = ImagePass({k: tensors[k].to(self.device) for k in PASS_KEYS}, json.loads(meta["original_size"]),
                         json.loads(meta["input_size"]), tensors["image"].numpy())
        self._remember(image_id, item)
        return item

    def _remember(self, image_id: str, item: ImagePass) -> None:
        self._memory[image_id] = item
        self._memory.move_to_end(image_id)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)
