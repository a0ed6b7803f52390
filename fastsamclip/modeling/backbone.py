"""SAM's ViT image encoder (ViTDet style), mirroring ``segment_anything/modeling/image_encoder.py``.

Constructors and parameter names are exactly upstream's, so ``build_backbone("vit_b").load_state_dict(
sam.image_encoder.state_dict())`` is strict and a diff against upstream stays readable; the pieces
that do not change (``PatchEmbed``, ``MLPBlock``, ``LayerNorm2d``, window partitioning) are
upstream's own. What differs from upstream:

- All attention goes through ``fastsamclip.kernels.relpos_attention`` (one op, several backends).
  The relative-position bias enters the op as two small tables, ``rel_h`` (N, H) and ``rel_w``
  (N, W) per head, instead of being added to a materialised (N, N) score matrix.
- Any input side that is a multiple of 16 is accepted (224, 448, 1024, non-square too): the
  absolute position embedding is resized bicubically (ViTDet's ``get_abs_pos``) and the global
  blocks' relative-position tables linearly (SAM's ``get_rel_pos``, here with its index tensors on
  the tables' device). Windowed blocks keep their 14 x 14 windows at every resolution; the grid is
  zero-padded to a multiple of the window and the padded tokens take part in attention, exactly as
  upstream.
- ``forward_features`` returns the trunk tokens (B, h, w, C) before the neck, which the CLIP head
  consumes; ``forward`` is upstream's (trunk + neck -> (B, 256, h, w)); ``check_input`` names what
  is wrong with an input before any kernel sees it.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.image_encoder import (
    PatchEmbed,
    window_partition,
    window_unpartition,
)

from fastsamclip.kernels import relpos_attention


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings (q_size, k_size, C) for query/key positions on one axis,
    the (2 * max - 1, C) table linearly resized when the axis length differs from training
    (upstream ``get_rel_pos``, same arithmetic)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def relpos_tables(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                  hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decomposed bias tables of ``relpos_attention`` from the UNSCALED q.

    q: (B, heads, N, d) on an H x W grid -> rel_h (B, heads, N, H), rel_w (B, heads, N, W) with
    ``rel_h[b, n, q, kh] = q[b, n, q] . Rh[qh - kh + H - 1]`` (upstream add_decomposed_rel_pos).
    """
    H, W = hw
    B, nh, N, d = q.shape
    Rh = get_rel_pos(H, H, rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(W, W, rel_pos_w).to(q.dtype)
    r_q = q.reshape(B * nh, H, W, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).reshape(B, nh, N, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).reshape(B, nh, N, W)
    return rel_h, rel_w


class Attention(nn.Module):
    """Multi-head attention with decomposed relative-position bias (upstream's constructor)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("Attention: input_size is needed for relative position tables")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        if self.use_rel_pos:
            rel_h, rel_w = relpos_tables(q, self.rel_pos_h, self.rel_pos_w, (H, W))
            x = relpos_attention(q, k, v, rel_h, rel_w, scale=self.scale)
        else:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(x)


class Block(nn.Module):
    """Transformer block; windowed attention when ``window_size > 0``, else global (upstream's)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, act_layer: Type[nn.Module] = nn.GELU,
                 use_rel_pos: bool = False, rel_pos_zero_init: bool = True, window_size: int = 0,
                 input_size: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              rel_pos_zero_init=rel_pos_zero_init,
                              input_size=input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def resize_abs_pos(pos_embed: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(1, h0, w0, C) -> (1, h, w, C), bicubic as ViTDet's ``get_abs_pos`` (identity at h0, w0)."""
    if tuple(pos_embed.shape[1:3]) == tuple(hw):
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's image encoder (upstream's constructor). Input (B, 3, H, W) normalised pixels, H and W
    multiples of the patch size; output (B, out_chans, H/16, W/16)."""

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 qkv_bias: bool = True, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 act_layer: Type[nn.Module] = nn.GELU, use_abs_pos: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, window_size: int = 0,
                 global_attn_indexes: Tuple[int, ...] = ()) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(kernel_size=(patch_size, patch_size), stride=(patch_size, patch_size),
                                      in_chans=in_chans, embed_dim=embed_dim)
        grid = img_size // patch_size
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            # Initialised at the pretraining image size; resized at other sizes (resize_abs_pos).
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  norm_layer=norm_layer, act_layer=act_layer, use_rel_pos=use_rel_pos,
                  rel_pos_zero_init=rel_pos_zero_init,
                  window_size=window_size if i not in global_attn_indexes else 0, input_size=(grid, grid))
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for images the encoder cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"image encoder: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"image encoder: expected images of shape (B, {self.in_chans}, H, W), got "
                f"{tuple(x.shape)}; add a batch dimension with x[None] or convert to {self.in_chans} channels"
            )
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(
                f"image encoder: input sides must be positive multiples of {p}, got {H} x {W}; "
                f"resize or pad the image (e.g. to {max(p, round(H / p) * p)} x {max(p, round(W / p) * p)})"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"image encoder: expected normalised floating-point pixels, got dtype {x.dtype}; "
                "normalise uint8 pixels first (SAMCLIP.preprocess / fastsamclip.transforms.normalize)"
            )
        w = self.patch_embed.proj.weight
        if x.device != w.device:
            raise ValueError(f"image encoder: input on {x.device} but the model is on {w.device}; move one to the other")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"image encoder: input dtype {x.dtype} differs from the weights' {w.dtype}; cast the "
                "input (x.to(model dtype)) or run under torch.autocast"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk tokens (B, h, w, C) before the neck."""
        self.check_input(x)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + resize_abs_pos(self.pos_embed, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_neck(self, features: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) trunk tokens -> (B, out_chans, h, w) SAM image embeddings."""
        return self.neck(features.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_neck(self.forward_features(x))
