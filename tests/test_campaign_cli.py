"""The bad-input and fault campaign, kept: the commands' cases (merge, predict, export, the optional
extras, the package, the files). Each case failed before its fix (a file replaced or mixed, a
wrong answer with exit 0, a traceback) and is now one line and exit 2, or the careful behaviour.
The training, evaluation, server and Python API cases are beside their own tests
(tests/train/test_campaign_train.py, tests/eval/test_campaign_eval.py,
tests/serve/test_campaign_serve.py, tests/test_campaign_api.py)."""

import errno
import json
import os
import stat
import sys

import pytest
import torch

import fastsamclip
from fastsamclip.checkpoint import read_teachers
from fastsamclip.cli import main
from fastsamclip.files import atomic_write, writable_dir

from .export.conftest import session_micro_model


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return session_micro_model(tmp_path_factory)


def one_line(capsys, rc, command, *matches):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"{command}: ") or err.startswith(f"fastsamclip {command}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for m in matches:
        assert m in err, err
    return err


def merge_args(micro, out, *extra):
    return ["merge", "--sam-checkpoint", micro["sam_path"], "--sam-type", "vit_micro", "--clip-model",
            f"local-dir:{micro['dir'] / 'clip'}", "--out", str(out), *extra]


# ------------------------------------------------------------------------------- merge
def test_merge_never_replaces_a_file_unasked_and_records_its_teachers(micro, tmp_path, capsys):
    out = tmp_path / "distilled.safetensors"
    out.write_bytes(b"a distilled checkpoint, days of training")
    one_line(capsys, main(merge_args(micro, out)), "merge", "exists already", "--overwrite")
    assert out.read_bytes() == b"a distilled checkpoint, days of training"
    assert main(merge_args(micro, out, "--overwrite")) == 0
    teachers = read_teachers(str(out))
    assert teachers == {"sam": micro["sam_path"], "clip": f"local-dir:{micro['dir'] / 'clip'}",
                        "random_teachers": False}


def test_merge_builds_a_random_clip_tower_only_when_asked_and_says_so_in_the_file(micro, tmp_path, capsys,
                                                                                 monkeypatch):
    import fastsamclip.cli.train as cli_train

    built = []
    real = cli_train.load_clip_teacher
    monkeypatch.setattr(cli_train, "load_clip_teacher",  # the random ViT-B-32 tower: the micro one stands in
                        lambda name, pretrained: built.append((name, pretrained)) or real(f"local-dir:{micro['dir'] / 'clip'}"))
    args = ["merge", "--sam-checkpoint", micro["sam_path"], "--sam-type", "vit_micro", "--clip-model", "ViT-B-32",
            "--out", str(tmp_path / "m.safetensors")]
    one_line(capsys, main(args), "merge", "no weights for the CLIP teacher", "--random-teachers")
    assert built == [] and not (tmp_path / "m.safetensors").exists()
    assert main([*args, "--random-teachers"]) == 0
    assert built == [("ViT-B-32", None)]
    assert read_teachers(str(tmp_path / "m.safetensors"))["clip"] == "random"
    assert read_teachers(str(tmp_path / "m.safetensors"))["random_teachers"] is True


def test_merge_refuses_a_head_width_of_zero_before_loading(micro, tmp_path, capsys):
    one_line(capsys, main(merge_args(micro, tmp_path / "m.safetensors", "--head-hidden", "0")), "merge",
             "--head-hidden 0")


# ------------------------------------------------------------------------------- predict
def no_loading(monkeypatch):
    import fastsamclip.cli.predict as cli_predict

    monkeypatch.setattr(cli_predict, "SAMCLIPPredictor", lambda *a, **k: pytest.fail("the checkpoint loaded first"))


def test_predict_never_mixes_two_runs_in_one_folder(micro, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", micro["photo"], "--checkpoint", micro["merged"], "--points", "40,30", "--boxes",
                 "10,10,60,50", "--out", str(out), "--device", "cpu"]) == 0
    first = sorted(os.listdir(out))
    assert "photo_box0.png" in first and "photo_point0.png" in first
    before = {f: (out / f).read_bytes() for f in first}
    capsys.readouterr()
    # A second run into the same folder: refused before the checkpoint loads, the folder untouched.
    rc = main(["predict", micro["photo"], "--checkpoint", micro["merged"], "--points", "41,30", "--out", str(out)])
    one_line(capsys, rc, "predict", "holds files already", "--overwrite")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    # --overwrite: the folder is the new run's alone (no box PNG of the first run left beside it).
    assert main(["predict", micro["photo"], "--checkpoint", micro["merged"], "--points", "41,30", "--out",
                 str(out) + "/", "--overwrite", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["photo.json", "photo_overlay.png", "photo_point0.png"]
    assert json.load(open(out / "photo.json"))["prompts"][0]["points"] == [[41.0, 30.0]]
    assert f"-> {out}/photo.json" in printed and "//" not in printed  # paths as the user writes them
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging folder left behind
    # --overwrite never empties a folder holding what predict does not write.
    (out / "notes.txt").write_text("mine")
    rc = main(["predict", micro["photo"], "--checkpoint", micro["merged"], "--points", "41,30", "--out", str(out),
               "--overwrite"])
    one_line(capsys, rc, "predict", "'notes.txt', which this command does not write")
    assert (out / "notes.txt").exists()


@pytest.mark.parametrize("flags, match", [
    (["--labels", "cat", "--resolution", "0"], "--resolution 0"),
    (["--labels", "cat", "--threshold", "nan"], "--threshold nan"),
    (["--labels", "cat", "--clip-token-pool", "0"], "--clip-token-pool 0"),
    (["--everything", "--label-threshold", "1.5"], "--label-threshold 1.5"),
])
def test_predict_numbers_are_checked_before_the_checkpoint_loads(micro, tmp_path, capsys, monkeypatch, flags, match):
    no_loading(monkeypatch)
    rc = main(["predict", micro["photo"], "--checkpoint", micro["merged"], *flags, "--out", str(tmp_path / "o")])
    one_line(capsys, rc, "predict", match)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU")
def test_predict_on_a_gpu_that_is_not_there_is_one_line(micro, tmp_path, capsys):
    rc = main(["predict", micro["photo"], "--checkpoint", micro["merged"], "--points", "40,30", "--device", "cuda",
               "--out", str(tmp_path / "o")])
    one_line(capsys, rc, "predict", "no CUDA GPU", "use cpu")


# ------------------------------------------------------------------------------- export
def test_export_folder_names_its_checkpoint_and_never_mixes_two_models(micro, tmp_path, capsys):
    deploy = tmp_path / "deploy"
    labels = ["--labels", "cat,dog", "--templates", "simple"]
    assert main(["export", "--checkpoint", micro["merged"], *labels, "--out", str(deploy)]) == 0
    meta = json.load(open(deploy / "export.json"))
    assert meta["checkpoint"]["path"] == os.path.abspath(micro["merged"])
    assert len(meta["checkpoint"]["sha256"]) == 64
    assert set(meta["files"]) == {"text_embeddings.npz"}
    npz = (deploy / "text_embeddings.npz").read_bytes()
    # Another checkpoint into the same folder: refused, nothing touched.
    other = tmp_path / "other.safetensors"
    assert main(merge_args(micro, other)) == 0
    capsys.readouterr()
    rc = main(["export", "--checkpoint", str(other), "--labels", "cat,dog,bird", "--templates", "simple",
               "--out", str(deploy)])
    one_line(capsys, rc, "export", "holds the export of another checkpoint", micro["merged"])
    # The same checkpoint again: a file it holds is never replaced in place.
    rc = main(["export", "--checkpoint", micro["merged"], *labels, "--out", str(deploy)])
    one_line(capsys, rc, "export", "has text_embeddings.npz already")
    assert (deploy / "text_embeddings.npz").read_bytes() == npz
    # --overwrite: the folder is replaced whole and names the new checkpoint.
    assert main(["export", "--checkpoint", str(other), *labels, "--out", str(deploy), "--overwrite"]) == 0
    assert json.load(open(deploy / "export.json"))["checkpoint"]["path"] == str(other)
    assert sorted(os.listdir(deploy)) == ["export.json", "text_embeddings.npz"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("res", ["0", "-16"])
def test_export_resolution_zero_is_refused_not_replaced_by_the_native_size(micro, tmp_path, capsys, res):
    rc = main(["export", "--checkpoint", micro["merged"], "--format", "aoti", "--resolution", res, "--device", "cpu",
               "--out", str(tmp_path / "d")])
    one_line(capsys, rc, "export", f"--resolution {res}")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------- optional extras
def _without(monkeypatch, *names):
    """Import of these packages fails, as where they are not installed."""
    for mod in list(sys.modules):
        if mod in names or mod.split(".")[0] in names:
            monkeypatch.setitem(sys.modules, mod, None)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("missing, argv, extra", [
    ("onnxscript", ["export", "--checkpoint", "{merged}", "--format", "onnx", "--out", "{tmp}/d"], "export"),
    ("pycocotools", ["eval", "instances", "--checkpoint", "{merged}", "--data-root", "{tmp}", "--dataset", "coco"],
     "eval"),
    ("webdataset", ["demo", "--out", "{tmp}/demo"], "train"),
    ("litserve", ["bench", "serve", "--quick"], "serve"),
])
def test_a_missing_extra_is_one_line_naming_it(micro, tmp_path, capsys, monkeypatch, missing, argv, extra):
    _without(monkeypatch, missing)
    rc = main([a.format(merged=micro["merged"], tmp=tmp_path) for a in argv])
    one_line(capsys, rc, argv[0], f"'{missing}'", f'pip install "fastsamclip[{extra}]"')


# ------------------------------------------------------------------------------- the package and its files
def test_subpackages_are_attributes_of_the_package():
    assert fastsamclip.__getattr__("kernels") is sys.modules["fastsamclip.kernels"]
    assert callable(fastsamclip.kernels.op_table)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastsamclip.__getattr__("nope")


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "a.json"), lambda tmp: open(tmp, "w").close())
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640
        os.chmod(tmp_path / "a.json", 0o604)  # a replaced file keeps the mode it had
        atomic_write(str(tmp_path / "a.json"), lambda tmp: open(tmp, "w").close())
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o604
    finally:
        os.umask(old)


def read_only_disk(monkeypatch, root):
    """``root`` (made here) is the mount point of a read-only file system: writes under it fail
    with EROFS (the tests may run as root, whom permission bits do not stop)."""
    os.makedirs(root, exist_ok=True)
    root = os.path.abspath(root)
    real_open, real_mkdir = os.open, os.mkdir

    def guard(path):
        if os.path.abspath(os.fsdecode(path)).startswith(root):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    def fake_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_open(path, flags, *a, **kw)

    def fake_mkdir(path, *a, **kw):
        guard(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_a_read_only_disk_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    read_only_disk(monkeypatch, tmp_path / "ro")
    from fastsamclip.errors import OutputError

    with pytest.raises(OutputError, match=r"--out .*ro/run: cannot write there: the disk is read-only"):
        writable_dir(str(tmp_path / "ro" / "run"), "--out", create=False)
    with pytest.raises(OutputError, match="cannot write .*a.json: the disk is read-only"):
        atomic_write(str(tmp_path / "ro" / "a.json"), lambda tmp: None)


def test_predict_on_a_read_only_disk_is_one_line_before_the_checkpoint_loads(micro, tmp_path, capsys, monkeypatch):
    read_only_disk(monkeypatch, tmp_path / "ro")
    no_loading(monkeypatch)
    rc = main(["predict", micro["photo"], "--checkpoint", micro["merged"], "--points", "40,30", "--out",
               str(tmp_path / "ro" / "pred")])
    one_line(capsys, rc, "predict", "the disk is read-only")
    assert os.listdir(tmp_path / "ro") == []
