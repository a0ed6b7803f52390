"""The backbone against segment_anything's ImageEncoderViT: same weights, fp32."""

import dataclasses

import pytest
import torch

from fastsamclip.kernels import use_backend
from fastsamclip.modeling import BACKBONE_CONFIGS, build_backbone
from fastsamclip.modeling.backbone import resize_abs_pos
from fastsamclip.data.samples import randomise_zero_tables
from fastsamclip.modeling import SamConfig, build_sam

from .helpers import assert_close_verbose


def sam_and_ours(backbone_cfg, seed=0):
    sam = build_sam(SamConfig(backbone=backbone_cfg))
    randomise_zero_tables(sam, torch.Generator().manual_seed(seed))
    ours = build_backbone(backbone_cfg)
    ours.load_state_dict(sam.image_encoder.state_dict(), strict=True)
    return sam.image_encoder.eval(), ours.eval()


@pytest.mark.parametrize("name", ["vit_micro", "vit_tiny"])
@pytest.mark.parametrize("img_size", [64, 96, 128, 160])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_equals_segment_anything_at_native_size(name, img_size, backend):
    """Trained at img_size (tables sized for it), fed img_size: windows padded or not."""
    cfg = dataclasses.replace(BACKBONE_CONFIGS[name], img_size=img_size)
    sam_enc, ours = sam_and_ours(cfg)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad(), use_backend(backend):
        expected = sam_enc(x)
        got = ours(x)
    # fp32 rounding: batched matmuls over (B, heads) instead of (B * heads) may sum in another order.
    assert_close_verbose(got, expected, 2e-5, 2e-5, f"{name} {img_size}px {backend}")


@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (128, 192), (80, 48)])
def test_other_resolutions_resize_tables_like_sam(hw):
    """Weights trained at 128 px, run at another (also non-square) size: equal to upstream with
    the absolute embedding resized bicubically (ViTDet) and the relative tables left to upstream's
    own get_rel_pos interpolation."""
    cfg = BACKBONE_CONFIGS["vit_tiny"]
    sam_enc, ours = sam_and_ours(cfg)
    grid = (hw[0] // 16, hw[1] // 16)
    sam_enc.pos_embed = torch.nn.Parameter(resize_abs_pos(sam_enc.pos_embed.detach(), grid))
    x = torch.randn(1, 3, *hw)
    with torch.no_grad(), use_backend("reference"):
        expected = sam_enc(x)
        got = ours(x)
    assert got.shape == (1, cfg.out_chans, *grid)
    assert_close_verbose(got, expected, 1e-5, 1e-5, f"{hw}")


def test_resize_abs_pos_is_bicubic_and_identity_at_native():
    pe = torch.randn(1, 8, 8, 4)
    assert resize_abs_pos(pe, (8, 8)) is pe
    out = resize_abs_pos(pe, (4, 6))
    expected = torch.nn.functional.interpolate(pe.permute(0, 3, 1, 2), size=(4, 6), mode="bicubic",
                                               align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(out, expected)


def test_vit_b_at_1024_equals_segment_anything():
    """SAM ViT-B itself: strict load of upstream's image encoder, one 1024 px image."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam_enc = sam_model_registry["vit_b"]().image_encoder.eval()
    randomise_zero_tables(sam_enc, torch.Generator().manual_seed(0))
    ours = build_backbone("vit_b").eval()
    ours.load_state_dict(sam_enc.state_dict(), strict=True)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = sam_enc(x)
        with use_backend("reference"):
            got_ref = ours(x)
        got_default = ours(x)
    assert got_ref.shape == (1, 256, 64, 64)
    assert_close_verbose(got_ref, expected, 1e-4, 1e-4, "vit_b reference backend")
    assert_close_verbose(got_default, expected, 1e-4, 1e-4, "vit_b default backend")


def test_state_dict_names_match_upstream_for_every_config():
    from segment_anything import sam_model_registry

    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            upstream = sam_model_registry[name]().image_encoder
            ours = build_backbone(name)
        up = {k: tuple(v.shape) for k, v in upstream.state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert up == mine, name


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(1, 3, 100, 128), ValueError, "multiples of 16, got 100 x 128"),
        (torch.randn(3, 128, 128), ValueError, r"expected images of shape \(B, 3, H, W\)"),
        (torch.randn(1, 4, 128, 128), ValueError, r"\(B, 3, H, W\)"),
        (torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8), TypeError, "normalised floating-point"),
        (torch.randn(1, 3, 128, 128, dtype=torch.float64), TypeError, "differs from the weights"),
        (torch.randn(1, 3, 128, 128, device="meta"), ValueError, "input on meta but the model is on cpu"),
        ([[1.0]], TypeError, "expected a torch.Tensor"),
    ],
)
def test_bad_images_get_clear_errors(x, exc, match):
    model = build_backbone("vit_tiny")
    with pytest.raises(exc, match=match):
        model(x)


def test_compiles_fullgraph():
    """No graph break anywhere in the backbone, attention included."""
    model = build_backbone("vit_micro").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(x)
    assert_close_verbose(got, expected, 1e-5, 1e-5, "compiled")
