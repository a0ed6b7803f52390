"""SAM's ViT image encoder (ViTDet style), mirroring ``segment_anything/modeling/image_encoder.py``.

Parameter names are exactly upstream's, so ``build_backbone("vit_b").load_state_dict(
sam.image_encoder.state_dict())`` is strict and a diff against upstream stays readable. What
differs from upstream:

- All attention goes through ``fastsamclip.kernels.relpos_attention`` (one op, several backends).
  The relative-position bias enters the op as two small tables, ``rel_h`` (N, H) and ``rel_w``
  (N, W) per head, instead of being added to a materialised (N, N) score matrix.
- Any input side that is a multiple of 16 is accepted (224, 448, 1024, non-square too): the
  absolute position embedding is resized bicubically (ViTDet's ``get_abs_pos``) and the global
  blocks' relative-position tables linearly (SAM's ``get_rel_pos``). Windowed blocks keep their
  14 x 14 windows at every resolution; the grid is zero-padded to a multiple of the window and the
  padded tokens take part in attention, exactly as upstream.
- ``forward_features`` returns the trunk tokens (B, h, w, C) before the neck, which the CLIP head
  consumes; ``forward`` is upstream's (trunk + neck -> (B, 256, h, w)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsamclip.kernels import relpos_attention


@dataclass(frozen=True)
class BackboneConfig:
    img_size: int = 1024  # the resolution the weights were trained at (sets table sizes)
    patch_size: int = 16  # pixels per patch side
    in_chans: int = 3
    embed_dim: int = 768  # transformer width
    depth: int = 12  # number of blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256  # neck output channels (SAM's prompt embedding dim)
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14  # window side (tokens) of the non-global blocks
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)  # blocks that attend over the whole grid
    norm_eps: float = 1e-6  # LayerNorm eps (SAM: 1e-6)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        d = dict(d)
        d["global_attn_indexes"] = tuple(d.get("global_attn_indexes", ()))
        return cls(**d)


BACKBONE_CONFIGS: Dict[str, BackboneConfig] = {
    # SAM's three image encoders (segment_anything/build_sam.py).
    "vit_b": BackboneConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": BackboneConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": BackboneConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Small configs with the same structure (windowed + global blocks, padding, rel-pos), for
    # tests and the CPU demo. Windows of 4 tokens on a 128px (8 x 8) grid; 6 tokens leave a
    # padded remainder on the same grid, the case SAM's 64 x 64 grid with 14-token windows has.
    "vit_tiny": BackboneConfig(img_size=128, embed_dim=64, depth=4, num_heads=2, window_size=6,
                               global_attn_indexes=(1, 3), out_chans=32),
    "vit_micro": BackboneConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3,
                                global_attn_indexes=(1,), out_chans=16),
}


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) tensor (upstream ``common.LayerNorm2d``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B C H W -> B H W C


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
    """Multi-head attention with decomposed relative-position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True,
                 input_size: Optional[Tuple[int, int]] = None) -> None:
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


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, ws, ws, C) with zero padding to a multiple of ws."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of ``window_partition``, cropping the padding away."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class Block(nn.Module):
    """Transformer block; windowed attention when ``window_size > 0``, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_rel_pos: bool = True, window_size: int = 0,
                 input_size: Optional[Tuple[int, int]] = None, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              input_size=input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio))
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
    """SAM's image encoder. Input (B, 3, H, W) normalised pixels, H and W multiples of the
    patch size; output (B, out_chans, H/16, W/16)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.img_size = c.img_size
        self.patch_size = c.patch_size
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        grid = c.img_size // c.patch_size
        self.pos_embed: Optional[nn.Parameter] = None
        if c.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, c.embed_dim))
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.use_rel_pos,
                  window_size=c.window_size if i not in c.global_attn_indexes else 0,
                  input_size=(grid, grid), norm_eps=c.norm_eps)
            for i in range(c.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(c.embed_dim, c.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(c.out_chans),
            nn.Conv2d(c.out_chans, c.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c.out_chans),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for images the encoder cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"image encoder: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"image encoder: expected images of shape (B, {self.config.in_chans}, H, W), got "
                f"{tuple(x.shape)}; add a batch dimension with x[None] or convert to {self.config.in_chans} channels"
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
                "convert with fastsamclip's preprocessing (uint8 -> normalised float)"
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


def get_backbone_config(name_or_config) -> BackboneConfig:
    if isinstance(name_or_config, BackboneConfig):
        return name_or_config
    if name_or_config not in BACKBONE_CONFIGS:
        raise ValueError(f"unknown backbone config {name_or_config!r}; known: {', '.join(BACKBONE_CONFIGS)}")
    return BACKBONE_CONFIGS[name_or_config]


def build_backbone(name_or_config="vit_b") -> ImageEncoderViT:
    """``build_backbone("vit_b")``: SAM ViT-B's image encoder, randomly initialised."""
    return ImageEncoderViT(get_backbone_config(name_or_config))
