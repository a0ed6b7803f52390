"""Shared by the training tests: tiny teachers in the official formats (vit_micro SAM, a 64 px
CLIP) and a small dataset in the real formats, written once per session."""

import pytest

from fastsamclip.data import samples
from fastsamclip.data.samples import write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher
from fastsamclip.train import Distiller, TrainConfig


@pytest.fixture(scope="package")
def env(tmp_path_factory):
    """Teachers in the official formats and a dataset in the real formats, written once."""
    root = tmp_path_factory.mktemp("train")
    pics = samples.load_sample_images(max_side=80)
    names = list(pics)
    shards = samples.write_clip_shards(root / "clip", [pics[n] for n in names], shard_size=4)
    samples.write_sa1b(root / "sa1b", [(pics[n], samples.synthetic_masks(pics[n])) for n in names[:6]])
    sam_path = write_sam_checkpoint(str(root / "sam.pth"), "vit_micro")
    clip_name = write_clip_local_dir(str(root / "clipm"))
    return {
        "root": root, "sam_path": sam_path, "clip_name": clip_name,
        "spec": str(root / "clip" / ("{00000..%05d}.tar" % (len(shards) - 1))),
        "sam": load_sam_teacher(sam_path, "vit_micro"), "clip": load_clip_teacher(clip_name),
    }


def make_cfg(env, out, **kw) -> TrainConfig:
    base = dict(sam_checkpoint=env["sam_path"], sam_type="vit_micro", clip_model=env["clip_name"],
                clip_pretrained=None, clip_data=env["spec"], sam_data=str(env["root"] / "sa1b"), out=str(out),
                stage1_steps=2, stage2_steps=2, stage3_steps=2, clip_batch=4, clip_base_res=64,
                clip_resolutions=(64, 96), stage3_resolutions=(64, 96, 128), sam_batch=2, masks_per_image=4,
                eval_images=1, eval_masks_per_image=4, progress=False, tensorboard=False, checkpoint_every=0,
                loss_backend="reference", clip_holdout=0.25)  # 12 D_CLIP images: 1% would hold none out
    base.update(kw)
    return TrainConfig(**base)


def trainer(env, out, **kw) -> Distiller:
    return Distiller(make_cfg(env, out, **kw), sam_teacher=env["sam"], clip_teacher=env["clip"])


