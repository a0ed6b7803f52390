"""D_CLIP decoding: the CPU path (JPEG draft mode) keeps CLIP's crop, the device path (run here on
CPU tensors) keeps to the stated tolerance, and the choice between them."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastsamclip import data as D
from fastsamclip.data import decode as DEC
from fastsamclip.data import samples as S
from fastsamclip.errors import ConfigError
from fastsamclip.train import config as train_config
from fastsamclip.transforms import clip_pixels, decode_rgb

from .conftest import jpeg_bytes, mean_abs


@pytest.fixture(scope="module")
def photos():
    """Photo-like 683 x 512 JPEGs (the size the pipeline's rates are quoted at) and one 4:3 portrait."""
    pics = S.load_sample_images(["astronaut", "coffee", "chelsea", "rocket"])
    out = [jpeg_bytes(np.asarray(Image.fromarray(a).resize((683, 512), Image.BICUBIC)), quality=90)
           for a in pics.values()]
    return out + [jpeg_bytes(np.asarray(Image.fromarray(pics["rocket"]).resize((300, 401), Image.BICUBIC)))]


def full(data, r):
    return clip_pixels(decode_rgb(data), r)


def test_the_configuration_offers_the_decoders_there_are():
    assert train_config.DECODERS == DEC.DECODERS


def test_without_draft_the_view_is_exactly_the_full_decodes(photos, images):
    # 448 px from a 512 px short side: no JPEG scale keeps it >= 448, so libjpeg decodes in full.
    for data in photos[:2]:
        assert torch.equal(D.decode_view(data, 448), full(data, 448))
    png = io.BytesIO()
    Image.fromarray(images["chelsea"]).save(png, format="PNG")  # not a JPEG: never drafted
    assert torch.equal(D.decode_view(png.getvalue(), 32), full(png.getvalue(), 32))


def test_draft_keeps_the_crop_and_moves_pixels_by_under_a_level_and_a_half(photos):
    for data in photos:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            im.draft("RGB", (96, 96))
            assert im.size[0] <= size[0] // 2  # the case drafted: decoded at a quarter or less of the pixels
        draft, ref = D.decode_view(data, 96), full(data, 96)
        assert draft.shape == (3, 96, 96) and draft.dtype == torch.uint8
        err = mean_abs(draft, ref)
        assert 0 < err < 1.5, err  # drafted (not the full decode's pixels), close to them
        # The same crop: one pixel of shift costs far more than the draft's filtering.
        shifted = full(data, 97)[:, :96, 1:97]
        assert err < 0.5 * mean_abs(draft, shifted)


def test_draft_resizes_by_the_originals_size_rule():
    """On a smooth gradient the draft's filtering costs ~0.3 levels, and any error in the geometry
    (the size rule taken from the drafted image, 113 instead of 112 px wide at 96 from 601 x 512;
    the drafted image's partial last block stretched over the original's extent) twice that."""
    w, h = 601, 512
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    data = jpeg_bytes(np.stack([x, y, (x + y) / 2], -1).round().astype(np.uint8))
    for r in (96, 112):
        assert mean_abs(D.decode_view(data, r), full(data, r)) < 0.4


def test_several_sides_at_once_equal_one_at_a_time(photos):
    for data in photos[::2]:
        views = D.decode_views(data, (448, 96, 224))
        assert sorted(views) == [96, 224, 448]
        for r, v in views.items():
            assert torch.equal(v, D.decode_view(data, r)), r


def test_device_path_on_cpu_tensors_keeps_the_stated_tolerance(photos, corrupt, images):
    png = io.BytesIO()
    Image.fromarray(images["coffee"]).save(png, format="PNG")
    # A truncated JPEG in the batch fails torchvision's batched call: the others still decode.
    datas = photos + [corrupt["garbage"], corrupt["truncated"], png.getvalue()]
    errors = []
    views = D.decode_views_on(datas, 224, "cpu", on_error=lambda i, e: errors.append(i))
    assert errors == [len(photos), len(photos) + 1] and views[len(photos)] is None  # each reported once
    assert torch.equal(views[-1], D.decode_view(png.getvalue(), 224))  # not a JPEG: the CPU path exactly
    for data, v in zip(photos, views):
        assert v.shape == (3, 224, 224) and v.dtype == torch.uint8
        ref = full(data, 224)
        # The same pixels resized by torch instead of PIL: rounding and filter taps only.
        assert mean_abs(v, ref) < 0.3 and (v.int() - ref.int()).abs().max() <= 8
        assert mean_abs(v, D.decode_view(data, 224)) < 1.5  # against the drafted CPU path
    many = D.decode_all_views_on(photos[:2], (96, 224), "cpu")
    assert all(torch.equal(m[224], v) for m, v in zip(many, views[:2]))


def test_the_choice_of_decoder(monkeypatch, photos):
    calls = []

    def measure():
        calls.append(1)
        return D.DecoderChoice("cuda", "measured")

    assert DEC.choose_decoder("auto", torch.device("cpu"), measure).name == "cpu" and not calls
    assert DEC.choose_decoder("cpu", torch.device("cuda"), measure).name == "cpu" and not calls
    with pytest.raises(ConfigError, match="--clip-decode cuda: the run's device is cpu"):
        DEC.choose_decoder("cuda", torch.device("cpu"), measure)
    with pytest.raises(ConfigError, match="clip_decode 'gpu'"):
        DEC.choose_decoder("gpu", torch.device("cpu"), measure)
    monkeypatch.setattr(DEC, "cuda_decode_available", lambda: True)
    assert DEC.choose_decoder("auto", torch.device("cuda"), measure).name == "cuda" and calls == [1]
    # The measurement itself, its device path run on CPU tensors: the faster path wins.
    m = DEC.measure_decoders(photos[:3], 96, "cpu", workers=3, repeats=1)
    assert m.cpu_rate > 0 and m.cuda_rate > 0 and m.name == ("cuda" if m.cuda_rate > m.cpu_rate else "cpu")
    assert "3 process(es)" in m.reason
    # A teacher cache's own path wins over a measurement, where the device can run it.
    assert D.select_decoder("auto", "unused", "cpu", 0, 64, cached="cpu").name == "cpu"
    assert D.select_decoder("auto", "unused", "cpu", 0, 64, cached="cuda").name == "cpu"
    assert D.select_decoder("auto", "unused", "cuda", 0, 64, cached="cuda").name == "cuda"  # nothing measured


@pytest.mark.parametrize("device, ranks, cpus, expect", [
    ("cpu", 1, 64, 0), ("cuda", 8, 16, 1), ("cuda", 8, 128, 15), ("cuda", 1, 256, 16), ("cuda", 2, 2, 1)])
def test_auto_workers(device, ranks, cpus, expect):
    assert D.auto_workers(device, ranks, cpus) == expect
