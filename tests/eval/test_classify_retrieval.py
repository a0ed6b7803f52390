"""Classification and retrieval on embeddings built so the answers are known (ties and a class with
no image included), and the merged model's image side equal to the predictor's."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsamclip.eval import classify, retrieval
from fastsamclip.eval.common import read_image
from fastsamclip.eval.datasets import ClassifyDataset, ClsSample, RetrievalDataset
from fastsamclip.eval.models import EvalModel, MergedModel
from fastsamclip.eval.sample_datasets import pictures

from ..helpers import assert_close_verbose


def _key(rgb):
    return hashlib.sha1(rgb.tobytes()).hexdigest()


class Constructed(EvalModel):
    """Image and text embeddings looked up from tables (keys: image content, class names, captions)."""

    kind = "constructed"
    tasks = ("classify", "retrieval")

    def __init__(self, images, texts):
        super().__init__(torch.device("cpu"))
        self.images, self.texts = images, texts

    def image_embeddings(self, rgbs, resolution):
        return F.normalize(torch.stack([self.images[_key(r)] for r in rgbs]), dim=-1)

    def class_embeddings(self, names, templates):
        return F.normalize(torch.stack([self.texts[n] for n in names]), dim=-1)

    def text_embeddings(self, texts):
        return self.class_embeddings(texts, None)

    def logit_scale(self):
        return 100.0


@pytest.fixture
def six_images(tmp_path):
    paths, keys = [], []
    for i, (name, rgb) in enumerate(pictures(6)):
        p = tmp_path / f"{name}.png"  # lossless, so the decoded bytes are the key
        from PIL import Image

        Image.fromarray(rgb).save(p)
        paths.append(str(p))
        keys.append(_key(read_image(str(p))))
    return paths, keys


E = torch.eye(4)


def test_classification_with_ties_and_a_class_without_images(six_images, one_process):
    paths, keys = six_images
    classes = ("a", "b", "c", "d")  # class "d" has no image
    labels = [0, 0, 1, 1, 2, 2]
    img = {keys[0]: E[0],                  # right
           keys[1]: E[1],                  # wrong: looks like b (rank of a: 1)
           keys[2]: E[1] + E[3],           # tie b = d: b has the lower index -> right
           keys[3]: E[0] + E[1],           # tie a = b: a comes first -> top-1 wrong, rank 1
           keys[4]: E[3] + 0.5 * E[2],     # d first, c second -> rank 1
           keys[5]: E[2]}                  # right
    model = Constructed(img, {n: E[i] for i, n in enumerate(classes)})
    ds = ClassifyDataset("folder", "val", "", classes, [ClsSample(i, p, y) for i, (p, y) in enumerate(zip(paths, labels))], "t")
    out = classify.evaluate(model, ds, one_process, 224, batch_size=4)
    m = out["metrics"]
    assert m["top1"] == pytest.approx(100 * 3 / 6) and m["top5"] == 100.0
    assert out["per_class"]["top1"] == {"a": 50.0, "b": 50.0, "c": 50.0, "d": None}
    assert m["classes_with_images"] == 3 and m["mean_per_class_top1"] == pytest.approx(50.0)
    ranks = [r for _, r, _ in classify.run_shard(model, ds, ds.samples, model.class_embeddings(classes, ""), 224,
                                                   6, 0, False).state]
    assert ranks == [0, 1, 0, 1, 1, 0]


def test_retrieval_recalls_with_ties(six_images, one_process):
    paths, keys = six_images
    n = 3
    imgs = {keys[i]: E[i] for i in range(n)}
    caps, owner, texts = [], [], {}
    for i in range(n):
        for k in range(2):
            c = f"caption {k} of image {i}"
            caps.append(c)
            owner.append(i)
            texts[c] = E[i]
    # Caption 0 of image 2 points at image 0 instead; caption 1 of image 1 ties images 1 and 0.
    texts["caption 0 of image 2"] = E[0]
    texts["caption 1 of image 1"] = E[0] + E[1]
    model = Constructed(imgs, texts)
    ds = RetrievalDataset("flickr30k", "test", "", paths[:n], caps, owner)
    m = retrieval.evaluate(model, ds, one_process, 224, batch_size=2)["metrics"]
    # text->image over 6 captions, two wrong at R@1: "0 of image 2" scores image 0 highest and image 2 ties
    # image 1 at 0, after it (rank 2); "1 of image 1" ties images 0 and 1, 0 first (rank 1).
    assert m["t2i_R@1"] == pytest.approx(100 * 4 / 6) and m["t2i_R@5"] == 100.0
    t2i = retrieval.stable_ranks(model.text_embeddings(caps) @ model.image_embeddings(
        [read_image(q) for q in paths[:n]], 0).T, torch.tensor(owner))
    assert t2i.tolist() == [0, 0, 0, 1, 2, 0]
    # image->text: every image has a caption equal to it; image 0's best captions "0 of 0", "1 of 0" and
    # "0 of 2" tie at cosine 1, and its own come first (lower index).
    assert m["i2t_R@1"] == 100.0
    assert m["R@1"] == pytest.approx((m["i2t_R@1"] + m["t2i_R@1"]) / 2)
    assert m["images"] == 3 and m["captions"] == 6


def test_merged_image_side_equals_the_predictors_classify(models):
    p = models["predictor"]
    model = MergedModel(p, p.device)
    rgbs = [rgb for _, rgb in pictures(3)]
    labels = ["cat", "coffee cup", "rocket", "astronaut"]
    text = model.class_embeddings(labels, "simple")
    assert_close_verbose(text, p.text_embeddings(labels, "simple"), 1e-6, 1e-5, "class embeddings")
    probs = (model.logit_scale() * model.image_embeddings(rgbs, 64) @ text.T).softmax(-1)
    assert_close_verbose(probs, torch.from_numpy(p.classify(rgbs, labels, resolution=64, templates="simple")),
                         1e-6, 1e-5, "probabilities")
    np.testing.assert_array_equal(model.class_embeddings(["x", "x"], "simple")[0].numpy(),
                                  model.class_embeddings(["x", "x"], "simple")[1].numpy())  # repeated names allowed
