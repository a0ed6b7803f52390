"""The torchrun path: two CPU processes (gloo) give the metrics of one process, and a bad input
found by one rank stops both with exit 2."""

import json
import os
import shutil
import socket
import subprocess
import sys

from fastsamclip.cli import main

from .test_cli import FAST

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_metrics_of_one(data, models, tmp_path, capsys):
    m = ["--checkpoint", models["merged"]]
    voc = os.path.join(data["root"], "VOCdevkit")
    bad = tmp_path / "VOC2012"
    shutil.copytree(data["voc"]["root"], bad)
    from PIL import Image

    label = bad / "SegmentationClass" / (data["voc"]["val"][1] + ".png")  # sample 1: rank 1's under 2 ranks
    im = Image.open(label)
    im.resize((im.width, im.height + 2)).save(label)
    tasks = {
        "semantic": ["semantic", *m, "--data-root", voc, "--dataset", "voc", "--templates", "simple", "--resolution", "64",
                     "--batch-size", "2"],
        "classify": ["classify", *m, "--data-root", data["folder"]["root"], "--dataset", "folder", "--templates", "simple",
                     "--resolution", "64", "--batch-size", "2"],
        "instances": ["instances", *m, "--data-root", data["coco"]["root"], "--dataset", "coco", "--detections",
                      data["coco"]["detections"]],
        "retrieval": ["retrieval", *m, "--data-root", data["flickr30k"]["root"], "--dataset", "flickr30k", "--resolution",
                      "64", "--batch-size", "2"],
    }
    commands = [["eval", *argv, "--out", str(tmp_path / f"{name}-2.json"), *FAST] for name, argv in tasks.items()]
    commands.append(["eval", "semantic", *m, "--data-root", str(bad), "--dataset", "voc", "--templates", "simple",
                     "--resolution", "64", *FAST])
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(HERE, "torchrun_eval.py"), str(tmp_path / "commands.json"), str(tmp_path / "codes")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        codes = json.loads((tmp_path / f"codes.rank{rank}").read_text())
        assert codes == [0, 0, 0, 0, 2], (rank, codes)
    assert r.stderr.count(f"eval semantic: {label}: label map is") == 1  # printed once, by rank 0
    for name, argv in tasks.items():
        assert main(["eval", *argv, "--out", str(tmp_path / f"{name}-1.json"), *FAST]) == 0
        one = json.loads((tmp_path / f"{name}-1.json").read_text())
        two = json.loads((tmp_path / f"{name}-2.json").read_text())
        assert two["world_size"] == 2 and one["world_size"] == 1
        assert two["metrics"] == one["metrics"], name
        assert two.get("per_class") == one.get("per_class"), name
        assert two["images"] == one["images"], name
    capsys.readouterr()
