"""The command line: info, demo (the README's main command) and merge."""

import os
import subprocess
import sys

import pytest
import torch

from fastsamclip.cli import main


def test_info_lists_versions_and_every_op_with_its_backends(capsys):
    from fastsamclip.kernels import OPS

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "open_clip_torch" in out
    for op, entry in OPS.items():
        assert f"  {op} [" in out, op
        for name in entry.names:
            assert any(line.strip().startswith(name) for line in out.splitlines()), (op, name)
    assert "no: " in out  # a backend that cannot run here says why


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
    from fastsamclip.data.samples import write_clip_local_dir, write_sam_checkpoint

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
    assert "relpos_attention [" in r.stdout


def test_merge_with_wrong_sam_type_says_so(tmp_path, capsys):
    from fastsamclip.data.samples import write_clip_local_dir, write_sam_checkpoint

    sam = write_sam_checkpoint(str(tmp_path / "sam.pth"), "vit_micro")
    clip = write_clip_local_dir(str(tmp_path / "clip"))
    rc = main(["merge", "--sam-checkpoint", sam, "--sam-type", "vit_tiny", "--clip-model", clip,
               "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("merge: ") and "pass --sam-type vit_micro" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_bench_command_runs_a_benchmark_into_the_results_folder(tmp_path):
    """`fastsamclip bench NAME ARGS...` hands ARGS to that benchmark; results land in
    FASTSAMCLIP_RESULTS_DIR when it is set."""
    env = dict(os.environ, FASTSAMCLIP_RESULTS_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "fastsamclip", "bench", "train", "--quick", "--configs", "plain",
                        "--stages", "1"], capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "train.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 and all(",plain,step," in line for line in lines[1:])
    assert (tmp_path / "train_img_s.png").stat().st_size > 1000


def test_bench_command_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["bench", "all", "--iters", "3"]) == 2
    assert "only --quick" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        main(["bench", "report", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit):
        main(["bench", "fastest"])
