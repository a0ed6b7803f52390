"""The merged model: initialisation as the paper does it, the three outputs, SAM-head equality."""

import pytest
import torch

from fastsamclip.modeling import (CLIPHeadConfig, SAMCLIPConfig, build_samclip, encode_prompts, pool_tokens,
                                  samclip_from_teachers)
from fastsamclip.data.samples import write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher

from .helpers import assert_close_verbose


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    sam = load_sam_teacher(write_sam_checkpoint(str(d / "sam.pth"), "vit_tiny"), "vit_tiny")
    clip = load_clip_teacher(write_clip_local_dir(str(d / "clip")))
    return sam, clip, samclip_from_teachers(sam, clip).eval()


def test_initialisation_follows_the_recipe(setup):
    sam, clip, model = setup
    for k, v in sam.image_encoder.state_dict().items():
        assert torch.equal(model.image_encoder.state_dict()[k], v)
    last = model.image_encoder.blocks[-1].state_dict()
    for blk in model.clip_head.blocks:
        assert all(torch.equal(blk.state_dict()[k], last[k]) for k in last)
        assert blk.window_size == model.image_encoder.blocks[-1].window_size
    assert len(model.clip_head.blocks) == 3
    assert model.clip_head.pool == "max"
    # MLP with two hidden layers to the teacher's embedding size.
    linears = [m for m in model.clip_head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[-1].out_features == clip.embed_dim
    assert all(not p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.clip_head.parameters())
    model.train()
    assert not model.text.training and model.clip_head.training
    model.eval()


def test_vit_b_head_adds_about_a_quarter():
    with torch.device("meta"):
        model = build_samclip(SAMCLIPConfig())  # ViT-B with a ViT-L/14-sized (768) head output
    ratio = model.num_parameters("clip_head") / model.num_parameters("image_encoder")
    assert 0.2 < ratio < 0.3, ratio


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (224, 224), (96, 160)])
def test_outputs_at_the_resolution_asked_for(setup, hw):
    _, clip, model = setup
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x, clip=True, sam=True, clip_patches=True)
    gh, gw = hw[0] // 16, hw[1] // 16
    assert out["clip"].shape == (2, clip.embed_dim)
    assert out["clip_patches"].shape == (2, gh, gw, clip.embed_dim)
    assert out["sam"].shape == (2, 32, gh, gw)
    # Pooled = MLP(LN(max over the head's patch tokens)): recompute by hand.
    with torch.no_grad():
        tokens = model.clip_head.tokens(model.forward_features(x))
        by_hand = model.clip_head.mlp(model.clip_head.norm(tokens.flatten(1, 2).max(dim=1).values))
        per_patch = model.clip_head.mlp(model.clip_head.norm(tokens))
    assert_close_verbose(out["clip"], by_hand, 1e-6, 1e-6, "pooled")
    assert_close_verbose(out["clip_patches"], per_patch, 1e-6, 1e-6, "per patch")


def test_sam_embeddings_equal_teacher_at_init(setup):
    sam, _, model = setup
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert_close_verbose(model(x, clip=False)["sam"], sam.image_encoder(x), 2e-5, 2e-5, "sam embeddings")


def _prompts():
    g = torch.Generator().manual_seed(1)
    pts = (torch.rand(3, 2, 2, generator=g) * 128, torch.tensor([[1, 0], [1, 1], [0, 1]]))
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 127.0, 127.0], [30.0, 5.0, 60.0, 50.0]])
    masks = torch.randn(3, 1, 32, 32, generator=g)
    return pts, boxes, masks


@pytest.mark.parametrize("which", ["points", "boxes", "masks", "points+boxes", "all"])
@pytest.mark.parametrize("multimask", [True, False])
def test_masks_equal_segment_anything(setup, which, multimask):
    """Same prompts through segment_anything's PromptEncoder + MaskDecoder at the native size."""
    sam, _, model = setup
    pts, boxes, masks = _prompts()
    kw = dict(points=pts if "points" in which or which == "all" else None,
              boxes=boxes if "boxes" in which or which == "all" else None,
              masks=masks if "masks" in which or which == "all" else None)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        emb = model(x, clip=False)["sam"]
        sparse_ref, dense_ref = sam.prompt_encoder(**kw)
        sparse, dense = encode_prompts(model.prompt_encoder, kw["points"], kw["boxes"], kw["masks"], (128, 128), (8, 8))
        assert_close_verbose(sparse, sparse_ref, 1e-6, 1e-6, "sparse")
        assert_close_verbose(dense, dense_ref, 1e-6, 1e-6, "dense")
        low, iou = model.predict_masks(emb, (128, 128), multimask_output=multimask, **kw)
        low_ref, iou_ref = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse_ref, dense_ref, multimask)
    k = 3 if multimask else 1
    assert low.shape == (3, k, 32, 32) and iou.shape == (3, k)
    assert_close_verbose(low, low_ref, 1e-5, 1e-5, "mask logits")
    assert_close_verbose(iou, iou_ref, 1e-5, 1e-5, "iou")


def test_masks_at_another_resolution(setup):
    _, _, model = setup
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        emb = model(x, clip=False)["sam"]
        low, iou = model.predict_masks(emb, boxes=torch.tensor([[10.0, 10.0, 150.0, 200.0]]))
    assert low.shape == (1, 3, 64, 48)


def test_predict_masks_errors(setup):
    _, _, model = setup
    emb = torch.randn(2, 32, 8, 8)
    with pytest.raises(ValueError, match="embeddings of one image, got batch 2"):
        model.predict_masks(emb, boxes=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least one prompt"):
        model.predict_masks(emb[:1])


def test_zero_shot_with_the_text_tower(setup):
    _, clip, model = setup
    labels = ["a cat", "a dog"]
    with torch.no_grad():
        t = model.encode_text(model.tokenizer(labels), normalize=True)
        assert_close_verbose(t, clip.encode_text(clip.tokenize(labels), normalize=True), 1e-6, 1e-6, "text")


def test_gradients_reach_trainable_parts(setup):
    sam, clip, _ = setup
    model = samclip_from_teachers(sam, clip)
    x = torch.randn(1, 3, 64, 64)
    out = model(x, clip=True, sam=True)
    (out["clip"].square().sum() + out["sam"].square().sum()).backward()
    for name in ("image_encoder", "clip_head"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads), name
    assert all(p.grad is None for p in model.text.parameters())


def test_head_hidden_width_option(setup):
    sam, clip, _ = setup
    model = samclip_from_teachers(sam, clip, clip_head=CLIPHeadConfig(out_dim=32, hidden_dim=48))
    assert model.clip_head.mlp[0].out_features == 48


def test_pool_tokens_averages_each_cell_and_the_cut_border_cells():
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    out = pool_tokens(x, 2)
    assert out.shape == (2, 3, 4, 3)
    for i in range(3):
        for j in range(4):  # the last row and column cells hold fewer tokens: their own mean
            cell = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            assert torch.allclose(out[:, i, j], cell.mean(dim=(1, 2))), (i, j)
    assert pool_tokens(x, 1) is x
    with pytest.raises(ValueError, match="positive"):
        pool_tokens(x, 0)


@pytest.mark.parametrize("k", [2, 4])
def test_token_pooled_clip_path_is_the_head_on_pooled_trunk_tokens(setup, k):
    _, clip, model = setup
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        full = model(x, clip=True, sam=True, clip_patches=True)
        out = model(x, clip=True, sam=True, clip_patches=True, clip_token_pool=k)
        tokens = model.clip_head.tokens(pool_tokens(model.forward_features(x), k))
        by_hand = model.clip_head.mlp(model.clip_head.norm(tokens.flatten(1, 2).max(dim=1).values))
    assert out["clip_patches"].shape == (1, -(-8 // k), -(-10 // k), clip.embed_dim)
    assert_close_verbose(out["clip"], by_hand, 1e-6, 1e-6, "pooled path")
    assert torch.equal(out["sam"], full["sam"])  # the SAM head never sees the pooling
    assert not torch.allclose(out["clip"], full["clip"], atol=1e-3)  # a different path, not the full one
