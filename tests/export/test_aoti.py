"""`fastsamclip export --format aoti`: one package per resolution, several in one call, loaded by a
process that imports only torch, equal to the eager model at any batch; what the package may carry
(no fastsamclip op); a failed export writes nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastsamclip.checkpoint import load_merged
from fastsamclip.cli import main
from fastsamclip.export import ImageEncoder, foreign_ops, max_rel_err, package_name
from fastsamclip.export import aoti
from fastsamclip.export.aoti import FUSED_OP, attention_candidates, export_program, is_triton_op

RTOL = 1e-4

# Run in a fresh interpreter: torch only. It must not import fastsamclip, and says so.
LOADER = r"""
import json, sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.load(sys.argv[2])
outs = [runner(x[:1]), runner(x)]          # batch 1 and batch 3: the batch is dynamic
torch.save(outs, sys.argv[3])
print(json.dumps({"metadata": runner.get_metadata(),
                  "fastsamclip": sorted(m for m in sys.modules if m.startswith("fastsamclip"))}))
"""


# Two sizes in one call: the native 64 px, and 192 px (a 12 x 12 grid), where a group of the CPU
# attention's (batch, head) pairs is smaller than the largest exported batch: the export failed
# there ("Constraints violated (batch)") while the grouping compared itself with the batch.
SIZES = (64, 192)


@pytest.fixture(scope="module")
def package(micro, tmp_path_factory):
    """One export of two small packages (AOTInductor's C++ compile on the CPU: ~30-60 s each), into
    a folder that does not exist yet."""
    out = tmp_path_factory.mktemp("aoti") / "deploy"
    assert main(["export", "--checkpoint", micro["merged"], "--format", "aoti", "--device", "cpu",
                 "--resolution", *map(str, SIZES), "--out", str(out)]) == 0
    return {"out": out, "path": str(out / package_name(64)), **micro}


def test_package_runs_without_the_model_code_and_equals_the_eager_model(package, tmp_path):
    x = torch.randn(3, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", LOADER, package["path"], str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["fastsamclip"] == []
    meta = report["metadata"]
    assert meta["attention"] == "sdpa" and meta["resolution"] == "64" and meta["device"] == "cpu"
    model = load_merged(package["merged"], "cpu")
    with torch.no_grad():
        ref = ImageEncoder(model)(x)
    one, three = torch.load(tmp_path / "y.pt")
    for name, got1, got3, want in zip(("sam_embedding", "clip_embedding", "clip_patches"), one, three, ref):
        assert max_rel_err(got1, want[:1]) < RTOL, name
        assert max_rel_err(got3, want) < RTOL, name


def test_package_metadata_beside_it(package):
    for res in SIZES:
        side = json.load(open(package["out"] / f"encoder_{res}.json"))
        assert side["attention"] == "sdpa" and "triton" in side["attention_not_used"] and side["resolution"] == res
        assert max(side["verified"]["max_rel_err"].values()) < RTOL
    assert {k: v["file"] for k, v in json.load(open(package["out"] / "export.json"))["aoti"].items()} == {
        str(r): package_name(r) for r in SIZES}
    assert sorted(os.listdir(package["out"].parent)) == ["deploy"]  # nothing staged left beside it


def test_the_second_size_takes_any_batch(package):
    runner = torch._inductor.aoti_load_package(str(package["out"] / package_name(192)))
    model = load_merged(package["merged"], "cpu")
    x = torch.randn(3, 3, 192, 192)
    with torch.no_grad():
        ref = ImageEncoder(model)(x)
        got = runner(x)
    assert got[0].shape == (3, ref[0].shape[1], 12, 12)
    for name, a, e in zip(("sam_embedding", "clip_embedding", "clip_patches"), got, ref):
        assert max_rel_err(a, e) < RTOL, name


def fake_compile(fail_at=None, log=None):
    """compile_package's stand-in (no compiler): a package file in the folder it is given, or an
    error at ``fail_at`` px."""

    def compile_package(model, folder, res, device, inductor_configs=None, check=True):
        if res == fail_at:
            raise RuntimeError(f"no compiler for {res} px")
        log.append(folder)
        with open(os.path.join(folder, package_name(res)), "wb") as f:
            f.write(b"package %d" % res)
        return {"file": package_name(res), "attention": "sdpa", "resolution": res}

    return compile_package


def test_the_export_lands_with_the_folders_other_files(micro, tmp_path, monkeypatch):
    folders = []
    monkeypatch.setattr(aoti, "compile_package", fake_compile(log=folders))
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "export.json").write_text('{"onnx": {"file": "encoder.onnx"}}')
    (out / "encoder.onnx").write_bytes(b"onnx")
    infos = aoti.export_aoti(load_merged(micro["merged"], "cpu"), str(out), [64, 128, 64], device="cpu")
    assert list(infos) == [64, 128] and len(folders) == 2  # each size once, in the order asked
    assert sorted(os.listdir(out)) == ["encoder.onnx", "encoder_128.pt2", "encoder_64.pt2", "export.json"]
    meta = json.load(open(out / "export.json"))
    assert meta["onnx"] == {"file": "encoder.onnx"} and sorted(meta["aoti"]) == ["128", "64"]
    assert all(os.path.dirname(f) == str(tmp_path) and not os.path.exists(f) for f in folders)  # staged beside, gone
    assert sorted(os.listdir(tmp_path)) == ["deploy"]


def test_a_failed_export_writes_nothing(micro, tmp_path, monkeypatch, capsys):
    """The second size fails after the first was written: no output folder, no staged file left;
    a folder that existed is as it was."""
    folders = []
    monkeypatch.setattr(aoti, "compile_package", fake_compile(fail_at=128, log=folders))
    out = tmp_path / "new" / "deploy"
    args = ["export", "--checkpoint", micro["merged"], "--format", "aoti", "--device", "cpu", "--resolution", "64",
            "128"]
    assert main([*args, "--out", str(out)]) == 2
    assert "export: no compiler for 128 px" in capsys.readouterr().err
    assert len(folders) == 1 and not os.path.exists(folders[0])
    assert os.listdir(tmp_path) == []  # neither new/ nor new/deploy
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "export.json").write_text('{"onnx": {}}')
    assert main([*args, "--out", str(kept)]) == 2
    assert os.listdir(kept) == ["export.json"] and (kept / "export.json").read_text() == '{"onnx": {}}'
    assert os.listdir(tmp_path) == ["kept"]


def test_the_fused_kernel_as_a_custom_op_is_what_a_package_cannot_carry(micro):
    """Exported with the Triton backend forced (the interpreter runs it on the CPU), the graph calls
    fastsamclip's custom op: the check that keeps such a graph out of a package finds it."""
    model = load_merged(micro["merged"], "cpu")
    program = export_program(model, 64, torch.device("cpu"), "triton")
    assert foreign_ops(program) == [FUSED_OP]
    assert foreign_ops(export_program(model, 64, torch.device("cpu"), "sdpa")) == []
    candidates, not_used = attention_candidates(torch.device("cpu"))
    assert candidates == ["sdpa"] and "GPU code" in not_used["triton"]


def test_is_triton_op_tells_triton_ops_from_custom_ops():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)

    @torch.library.triton_op("fastsamclip_test::copy", mutates_args=())
    def copy(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        torch.library.wrap_triton(_copy)[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
        return y

    @torch.library.custom_op("fastsamclip_test::plain", mutates_args=())
    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    assert is_triton_op("fastsamclip_test::copy")
    assert not is_triton_op("fastsamclip_test::plain")
