"""open_clip's interface on the merged model, run by an open_clip tool: clip_benchmark's zero-shot
classification and retrieval evaluation functions (PyPI clip-benchmark 1.6.2), against the merged
model through ``fastsamclip.open_clip_compat`` and against its own CLIP teacher through open_clip,
give the numbers of ``fastsamclip eval`` on the same small datasets the package writes."""

import csv
import json
import os

import numpy as np
import open_clip
import open_clip.zero_shot_metadata as zsm
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from fastsamclip import open_clip_compat
from fastsamclip.checkpoint import save_merged
from fastsamclip.cli import main
from fastsamclip.data.samples import TINY_CLIP_CFG, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.eval import sample_datasets as sd
from fastsamclip.modeling import (
    CheckpointError,
    CLIPHeadConfig,
    load_clip_teacher,
    load_sam_teacher,
    samclip_from_teachers,
)
from fastsamclip.transforms import clip_pixels

from .helpers import assert_close_verbose

# clip-benchmark requires transformers and pycocoevalcap (~100 MB), which these two functions do not
# use: it is installed on its own, `pip install --no-deps clip-benchmark==1.6.2` (the test extra
# has scikit-learn, which the classification metrics import).
NO_DEPS = "install it with: pip install --no-deps clip-benchmark==1.6.2"
zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification", reason=NO_DEPS)
zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval", reason=NO_DEPS)

CLASSES = ("cat", "coffee cup", "rocket", "coins", "camera", "clock")  # >= 5: clip_benchmark reports top-5
# One batch size on both sides: a batch of another size may round the embeddings differently.
BATCH = 4
RECALL_KS = (1, 5)  # clip_benchmark needs k <= the number of images (5 here)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("open-clip-compat")
    sam = load_sam_teacher(write_sam_checkpoint(str(d / "sam.pth"), "vit_micro"), "vit_micro")
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["text_cfg"].update(width=32, heads=1, layers=1)
    clip_name = write_clip_local_dir(str(d / "clip"), model_cfg=cfg)
    clip = load_clip_teacher(clip_name)
    merged = str(d / "merged.safetensors")
    save_merged(samclip_from_teachers(sam, clip, clip_head=CLIPHeadConfig(num_blocks=1, out_dim=clip.embed_dim),
                                      sam_config="vit_micro"), merged)
    no_text = str(d / "no-text.safetensors")
    save_merged(samclip_from_teachers(sam, None, clip_head=CLIPHeadConfig(num_blocks=1, out_dim=clip.embed_dim),
                                      sam_config="vit_micro"), no_text)
    return {"dir": d, "merged": merged, "no_text": no_text, "clip_name": clip_name,
            "folder": sd.write_image_folder(str(d / "folder"), CLASSES, per_class=2),
            # 5 test images: the writer's sixth is its second again (skimage's "cat" is "chelsea"),
            # and two equal images tie in every ranking, which the two sides may break differently.
            "flickr": sd.write_karpathy(str(d / "flickr30k"), "flickr30k", n_test=5)}


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` with the count taken as a 0-d tensor: its own calls
    ``float()`` on a one-element array, which numpy >= 2.4 refuses (an upstream bug, open in
    CLIP_benchmark's tracker). Same ranks, same arithmetic."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


@pytest.fixture
def clip_benchmark_accuracy(monkeypatch):
    """clip_benchmark's own accuracy where it runs on this numpy, the one above where it cannot."""
    try:
        zeroshot_classification.accuracy(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
    except TypeError:
        monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)


def models(setup, which):
    """(model, preprocess, tokenizer, the eval flags of the same model)."""
    if which == "merged":
        # 64 px, the CLIP teacher's size here (the default, 224, costs more and shows nothing more).
        model, preprocess, tokenizer = open_clip_compat.load(setup["merged"], device="cpu", resolution=64)
        return model, preprocess, tokenizer, ["--checkpoint", setup["merged"], "--dtype", "fp32", "--resolution", "64"]
    name = setup["clip_name"]
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name), ["--teacher", "clip", "--clip-model", name]


def run_eval(args, out):
    assert main(["eval", *args, "--no-progress", "--workers", "0", "--batch-size", str(BATCH), "--out", str(out)]) == 0
    return json.load(open(out))["metrics"]


class Karpathy(Dataset):
    """The test split of a Karpathy json as clip_benchmark's retrieval datasets give it: (image, captions)."""

    def __init__(self, root, transform, per_image=5):
        images = json.load(open(os.path.join(root, "dataset_flickr30k.json")))["images"]
        self.items = [(os.path.join(root, "flickr30k-images", im["filename"]),
                       [s["raw"] for s in im["sentences"][:per_image]]) for im in images if im["split"] == "test"]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, captions = self.items[i]
        return self.transform(Image.open(path)), captions


def image_captions_collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@pytest.mark.parametrize("which", ["merged", "teacher"])
def test_clip_benchmark_zero_shot_classification_equals_fastsamclip_eval(setup, which, tmp_path,
                                                                        clip_benchmark_accuracy):
    model, preprocess, tokenizer, flags = models(setup, which)
    data = ImageFolder(os.path.join(setup["folder"]["root"], "val"), transform=preprocess)
    classnames = [c.replace("_", " ") for c in data.classes]
    templates = [t("{c}") for t in zsm.SIMPLE_IMAGENET_TEMPLATES]  # clip_benchmark fills "{c}"
    loader = DataLoader(data, batch_size=BATCH)
    bench = zeroshot_classification.evaluate(model, loader, tokenizer, classnames, templates, "cpu", amp=False)
    ours = run_eval(["classify", *flags, "--data-root", setup["folder"]["root"], "--dataset", "folder",
                     "--templates", "simple", "--save-predictions", str(tmp_path)], tmp_path / "r.json")
    assert ours["top1"] == pytest.approx(100 * bench["acc1"], abs=1e-9)
    assert ours["top5"] == pytest.approx(100 * bench["acc5"], abs=1e-9)
    assert ours["mean_per_class_top1"] == pytest.approx(100 * bench["mean_per_class_recall"], abs=1e-9)
    # Image by image: clip_benchmark's classifier and logits (the functions evaluate runs) against
    # what eval wrote, the top class and the rank of the true one (ties to the lower index, as
    # eval breaks them), so that equal accuracies cannot hide different answers.
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    ranks = (order == target[:, None]).int().argmax(1)
    bench_rows = {os.path.abspath(p): (classnames[int(o[0])], int(r))
                  for (p, _), o, r in zip(data.samples, order, ranks)}
    with open(tmp_path / "folder_val_predictions.csv") as f:
        eval_rows = {os.path.abspath(r["file"]): (r["prediction"], int(r["rank_of_label"])) for r in csv.DictReader(f)}
    assert eval_rows == bench_rows
    assert len({r for _, r in bench_rows.values()}) > 2, "the true classes' ranks barely vary: this says little"


@pytest.mark.parametrize("which", ["merged", "teacher"])
def test_clip_benchmark_zero_shot_retrieval_equals_fastsamclip_eval(setup, which, tmp_path):
    model, preprocess, tokenizer, flags = models(setup, which)
    loader = DataLoader(Karpathy(setup["flickr"]["root"], preprocess), batch_size=BATCH,
                        collate_fn=image_captions_collate)
    bench = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=list(RECALL_KS))
    ours = run_eval(["retrieval", *flags, "--data-root", setup["flickr"]["root"], "--dataset", "flickr30k"],
                    tmp_path / "r.json")
    for k in RECALL_KS:
        # clip_benchmark's "image retrieval" ranks images for each caption: fastsamclip's text-to-image.
        # Its recalls are float32 means (1 / 30 is 0.033333335), eval's float64.
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * bench[f"image_retrieval_recall@{k}"], abs=1e-4), k
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * bench[f"text_retrieval_recall@{k}"], abs=1e-4), k
    assert 0 < ours["i2t_R@5"] < 100 or 0 < ours["t2i_R@1"] < 100, "all-or-nothing recalls would say little"


def test_the_open_clip_interface_is_the_models_own_clip_path(setup):
    model, preprocess, tokenizer = open_clip_compat.load(setup["merged"], device="cpu")
    rgb = np.asarray(Image.open(os.path.join(setup["folder"]["root"], "val", "cat", os.listdir(
        os.path.join(setup["folder"]["root"], "val", "cat"))[0])).convert("RGB"))
    x = preprocess(Image.fromarray(rgb))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x, model.preprocess(clip_pixels(rgb, 224)))  # the inputs eval and classify give the head
    with torch.no_grad():
        emb = model.encode_image(x[None])
        assert_close_verbose(emb, model(x[None], clip=True, sam=False)["clip"], 0, 0, "encode_image")
        assert_close_verbose(model.encode_image(x[None], normalize=True), emb / emb.norm(dim=-1, keepdim=True),
                             1e-6, 0, "normalize=True")
    assert torch.equal(model.logit_scale, model.text.logit_scale)
    assert preprocess(rgb).equal(x)  # arrays as well as PIL images
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model.image_transform(100)
    with pytest.raises(CheckpointError, match="no text tower"):
        open_clip_compat.load(setup["no_text"], device="cpu")
