"""Teachers through their own libraries, official formats, and the merged checkpoint."""

import os

import pytest
import torch

from fastsamclip.checkpoint import load_merged, read_merged_config, save_merged
from fastsamclip.modeling import CLIPHeadConfig, samclip_from_teachers
from fastsamclip.data.samples import write_clip_checkpoint, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import CheckpointError, build_sam, load_clip_teacher, load_sam_teacher

from .helpers import assert_close_verbose


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return {
        "sam_tiny": write_sam_checkpoint(str(d / "sam_vit_tiny.pth"), "vit_tiny"),
        "sam_micro": write_sam_checkpoint(str(d / "sam_vit_micro.pth"), "vit_micro"),
        "clip_dir": write_clip_local_dir(str(d / "clip")),
        "clip_file": write_clip_checkpoint(str(d / "tiny_clip.pt"), "fastsamclip-test-tiny-clip"),
        "dir": d,
    }


# ------------------------------------------------------------------------------------- SAM
def test_sam_teacher_equals_segment_anything_loading(files):
    """Our loader builds the same module tree and weights as segment_anything's own load path."""
    sam = load_sam_teacher(files["sam_tiny"], "vit_tiny")
    ref = build_sam("vit_tiny")
    ref.load_state_dict(torch.load(files["sam_tiny"]))
    for (k, a), (k2, b) in zip(sam.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not any(p.requires_grad for p in sam.parameters())


def test_vit_b_builder_is_segment_anythings(files):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = build_sam("vit_b")
        theirs = sam_model_registry["vit_b"]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_not_a_sam_checkpoint(files, tmp_path):
    p = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.randn(2, 2)}, p)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint: it has no 'image_encoder"):
        load_sam_teacher(str(p), "vit_tiny")


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.pth"
    p.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="could not be read as a torch checkpoint"):
        load_sam_teacher(str(p), "vit_tiny")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="SAM checkpoint not found: /nope/sam.pth"):
        load_sam_teacher("/nope/sam.pth", "vit_tiny")


def test_wrong_size_names_the_right_one(files):
    with pytest.raises(CheckpointError, match="is a SAM vit_micro checkpoint but model type 'vit_tiny'"):
        load_sam_teacher(files["sam_micro"], "vit_tiny")


def test_missing_and_extra_keys_are_listed(files, tmp_path):
    sd = torch.load(files["sam_tiny"])
    del sd["mask_decoder.iou_token.weight"]
    del sd["image_encoder.blocks.0.attn.rel_pos_h"]
    sd["image_encoder.blocks.0.attn.surprise"] = torch.zeros(1)
    p = tmp_path / "broken.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_sam_teacher(str(p), "vit_tiny")
    msg = str(e.value)
    assert "missing keys: image_encoder.blocks.0.attn.rel_pos_h, mask_decoder.iou_token.weight" in msg
    assert "unexpected keys: image_encoder.blocks.0.attn.surprise" in msg


def test_shape_mismatch_is_listed(files, tmp_path):
    sd = torch.load(files["sam_tiny"])
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    p = tmp_path / "shape.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=r"shape mismatches: mask_decoder.iou_token.weight \(1, 7\) vs model \(1, 32\)"):
        load_sam_teacher(str(p), "vit_tiny")


# ------------------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("form", ["local-dir", "name+file"])
def test_clip_teacher_equals_open_clip(files, form):
    import open_clip

    if form == "local-dir":
        name, pretrained = files["clip_dir"], None
    else:
        name, pretrained = files["clip_file"]
    teacher = load_clip_teacher(name, pretrained)
    ref = open_clip.create_model(name, pretrained=pretrained).eval()
    tok = open_clip.get_tokenizer(name)
    texts = ["a photo of a cat", "a diagram", "two dogs on a beach"]
    images = torch.randn(2, 3, teacher.image_size, teacher.image_size)
    with torch.no_grad():
        # Same weights and code; attention may take another fused path when no parameter
        # requires grad, hence fp32 rounding rather than bit equality.
        assert_close_verbose(teacher.encode_image(images), ref.encode_image(images), 1e-6, 1e-5, "image")
        assert torch.equal(teacher.tokenize(texts), tok(texts))
        assert_close_verbose(teacher.encode_text(teacher.tokenize(texts)), ref.encode_text(tok(texts)), 1e-6, 1e-5, "text")
    assert teacher.embed_dim == 32 and teacher.image_size == 64
    assert not any(p.requires_grad for p in teacher.parameters())


def test_clip_unknown_name_and_missing_file():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope-99'"):
        load_clip_teacher("ViT-Nope-99")
    with pytest.raises(FileNotFoundError, match="CLIP pretrained file not found"):
        load_clip_teacher("ViT-B-16", "/nope/clip.pt")


def test_real_clip_names_resolve_offline():
    """The paper's teacher architecture builds from open_clip's own config (weights are separate)."""
    from fastsamclip.modeling.teachers import clip_model_config

    cfg = clip_model_config("ViT-L-14")
    assert cfg["embed_dim"] == 768


# ------------------------------------------------------------------------------------- merged
@pytest.fixture(scope="module")
def merged(files):
    sam = load_sam_teacher(files["sam_tiny"], "vit_tiny")
    clip = load_clip_teacher(files["clip_dir"])
    model = samclip_from_teachers(sam, clip).eval()
    return sam, clip, model


def test_merged_round_trip_without_teachers(merged, tmp_path):
    sam, clip, model = merged
    path = str(tmp_path / "m.safetensors")
    save_merged(model, path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic write left nothing
    cfg = read_merged_config(path)
    assert cfg == model.config
    loaded = load_merged(path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert any(k.startswith("text.") for k in sd) and not any(k.startswith("text.visual") for k in sd)
    x = torch.randn(1, 3, 128, 128)
    tokens = clip.tokenize(["a cat"])
    with torch.no_grad():
        a, b = model(x, clip_patches=True), loaded(x, clip_patches=True)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert_close_verbose(loaded.encode_text(loaded.tokenizer(["a cat"])), clip.encode_text(tokens), 1e-6, 1e-5, "text")


def test_merged_loader_rejects_other_files(files, tmp_path):
    with pytest.raises(CheckpointError, match="not a merged fastsamclip checkpoint.*fastsamclip merge"):
        load_merged(files["sam_tiny"])
    from safetensors.torch import save_file

    p = str(tmp_path / "plain.safetensors")
    save_file({"a": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError, match="safetensors file but not a merged"):
        load_merged(p)
    with pytest.raises(FileNotFoundError, match="merged checkpoint not found"):
        load_merged(str(tmp_path / "none.safetensors"))


def test_merged_with_missing_weights_lists_them(merged, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, _, model = merged
    path = str(tmp_path / "m.safetensors")
    save_merged(model, path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    del sd["clip_head.mlp.0.weight"]
    save_file(sd, path, metadata=meta)
    with pytest.raises(CheckpointError, match="missing keys: clip_head.mlp.0.weight"):
        load_merged(path)


def test_head_size_must_match_teacher(files):
    sam = load_sam_teacher(files["sam_tiny"], "vit_tiny")
    clip = load_clip_teacher(files["clip_dir"])
    with pytest.raises(ValueError, match="differs from the CLIP teacher's embedding size 32"):
        samclip_from_teachers(sam, clip, clip_head=CLIPHeadConfig(out_dim=64))
