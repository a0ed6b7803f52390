"""Benchmarks leave nothing behind: their checkpoints and data go to scratch folders that are removed
when the process exits (each quick run used to leave a ~29 MB checkpoint folder in the temp dir)."""

import glob
import os
import subprocess
import sys

import fastsamclip.bench as bench_pkg

SCRIPT = """
import os, sys
from fastsamclip.bench.harness import scratch_dir
path = scratch_dir("fastsamclip-scratch-test-")
open(os.path.join(path, "model.safetensors"), "wb").write(b"x" * 1024)
print(path)
"""


def test_a_scratch_folder_is_gone_when_the_process_exits():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert path and not os.path.exists(path)


def test_no_benchmark_makes_a_temporary_folder_it_does_not_remove():
    folder = os.path.dirname(bench_pkg.__file__)
    offenders = [os.path.basename(f) for f in glob.glob(os.path.join(folder, "*.py"))
                 if os.path.basename(f) != "harness.py" and "mkdtemp(" in open(f).read()]
    assert not offenders, f"use harness.scratch_dir (removed at exit) instead of tempfile.mkdtemp in {offenders}"
