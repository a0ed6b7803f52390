"""fastsamclip: SAM-CLIP, one ViT backbone for promptable masks and image-text semantics."""

import os as _os

__version__ = "0.1.0"

# In a source checkout, ``kernels/`` and ``bench/`` sit beside this package; installs (regular or
# editable) map them to ``fastsamclip.kernels`` / ``fastsamclip.bench``. Let a plain checkout on
# sys.path resolve them the same way.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "attention.py")) and not _os.path.isdir(
        _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels")):
    __path__.append(_root)  # noqa: F821 (package __path__)
