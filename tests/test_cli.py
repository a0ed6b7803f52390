"""The command line: info, demo (the README's main command) and merge."""

import os
import subprocess
import sys

import pytest
import torch

from fastsamclip.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "open_clip_torch" in out
    assert "attention backends" in out
    assert "reference" in out and "sdpa" in out


def test_demo_runs_and_agrees_with_its_teachers(tmp_path):
    from fastsamclip.demo import run_demo

    report = run_demo(out_dir=str(tmp_path), quiet=True)
    assert report["reload_identical"] and report["text_equals_teacher"]
    assert report["mask_max_abs_diff_vs_sam"] < 1e-4
    assert os.path.getsize(report["overlay"]) > 10_000
    assert os.path.exists(tmp_path / "merged.safetensors")
    native = [r for r in report["resolutions"] if r[0] == 128][0]
    assert native[-1] < 1e-4  # student SAM embeddings == SAM teacher's at init


def test_merge_command_writes_a_loadable_checkpoint(tmp_path):
    from fastsamclip.checkpoint import load_merged
    from fastsamclip.samples import write_clip_local_dir, write_sam_checkpoint

    sam = write_sam_checkpoint(str(tmp_path / "sam.pth"), "vit_micro")
    clip = write_clip_local_dir(str(tmp_path / "clip"))
    out = str(tmp_path / "merged.safetensors")
    assert main(["merge", "--sam-checkpoint", sam, "--sam-type", "vit_micro", "--clip-model", clip, "--out", out]) == 0
    model = load_merged(out)
    assert model.config.sam.backbone.embed_dim == 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))["clip"].shape == (1, 32)


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastsamclip", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "attention backends" in r.stdout


def test_merge_with_wrong_sam_type_says_so(tmp_path, capsys):
    from fastsamclip.samples import write_clip_local_dir, write_sam_checkpoint
    from fastsamclip.teachers import CheckpointError

    sam = write_sam_checkpoint(str(tmp_path / "sam.pth"), "vit_micro")
    clip = write_clip_local_dir(str(tmp_path / "clip"))
    with pytest.raises(CheckpointError, match="pass --sam-type vit_micro"):
        main(["merge", "--sam-checkpoint", sam, "--sam-type", "vit_tiny", "--clip-model", clip,
              "--out", str(tmp_path / "m.safetensors")])
