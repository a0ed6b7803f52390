#!/usr/bin/env bash
# The one command for a freshly lent GPU machine (Python 3.12, torch, triton, nvcc, cmake; no
# internet), run in a copy of this checkout that carries .gpu-carry/ (bench/gpu_rehearsal.sh makes
# it: the wheels the machine lacks, an sm_90a Triton cache, the commit, Python's headers):
#
#   bash bench/gpu_device.sh OUT            # OUT: a folder whose files come back
#   bash bench/gpu_device.sh OUT --rehearse # the same on a machine without a GPU: --dry-run instead
#
# 1. preflight, in seconds: every missing import, wheel, tool or header listed at once, exit 2;
# 2. the carried wheels installed to a folder on PYTHONPATH, the checkout installed editable (the
#    CUDA library built with CMake and nvcc), the Triton cache unpacked into TRITON_CACHE_DIR;
# 3. `fastsamclip bench gpu` (at most 6 minutes), then OUT/fastsamclip-gpu.tar.gz (every file the
#    run and this script wrote) and OUT/summary.md, and the summary printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash bench/gpu_device.sh OUT [--rehearse]}"
MODE="${2:-}"
PY="${PYTHON:-python3}"
CARRY=.gpu-carry
RUN="${FASTSAMCLIP_RUN_DIR:-/tmp/fastsamclip-gpu-run}"
SITE="${FASTSAMCLIP_SITE_DIR:-/tmp/fastsamclip-site}"
T0=$(date +%s)
mkdir -p "$OUT" "$RUN"
LOG="$RUN/device.log"
note() { echo "[gpu_device +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

note "preflight ($("$PY" --version 2>&1), $(uname -m))"
REHEARSE="$MODE" CARRY="$CARRY" "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import glob, importlib.util, os, re, shutil, subprocess, sys, sysconfig, zipfile
missing, notes = [], []
need = {"torch": "torch", "torchvision": "torchvision", "triton": "triton", "numpy": "numpy", "timm": "timm",
        "regex": "regex", "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "tqdm": "tqdm",
        "yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image", "packaging": "packaging", "pytest": "pytest",
        "setuptools": "setuptools"}
for mod, pkg in need.items():
    if importlib.util.find_spec(mod) is None:
        missing.append(f"python package {pkg} (import {mod})")
for mod, why in {"xdist": "the tests run in one process", "pytest_timeout": "no per-test time limit",
                 "pynvml": "no driver version or energy per image"}.items():
    if importlib.util.find_spec(mod) is None:
        notes.append(f"{mod} missing: {why}")
carry = os.environ["CARRY"]
wheels = {os.path.basename(w).split("-")[0].lower().replace("_", "-"): w for w in glob.glob(f"{carry}/wheels/*.whl")}
for pkg in ("open-clip-torch", "ftfy", "wcwidth", "segment-anything", "webdataset", "braceexpand", "pycocotools"):
    if pkg not in wheels and importlib.util.find_spec(pkg.replace("-torch", "").replace("-", "_")) is None:
        missing.append(f"carried wheel {pkg} in {carry}/wheels (bash bench/gpu_wheels.sh {carry}/wheels)")
def version(text):  # "3.28.3" -> (3, 28, 3)
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])
if "open-clip-torch" in wheels and importlib.util.find_spec("timm") and importlib.util.find_spec("packaging"):
    import timm
    from packaging.requirements import Requirement
    from packaging.version import Version
    meta = zipfile.ZipFile(wheels["open-clip-torch"]).read(
        next(n for n in zipfile.ZipFile(wheels["open-clip-torch"]).namelist() if n.endswith("METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist: timm") and "extra" not in line:
            req = Requirement(line.split(":", 1)[1].strip())
            if Version(timm.__version__) not in req.specifier:
                missing.append(f"timm {timm.__version__} does not meet open_clip's {req}")
if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
    missing.append("a C compiler (gcc): Triton builds its launchers with it")
inc = sysconfig.get_paths()["include"]
if not os.path.exists(os.path.join(inc, "Python.h")):
    carried = glob.glob(f"{carry}/python-include/python3.*/Python.h")
    if carried:
        notes.append(f"Python.h not in {inc}: the carried {os.path.dirname(carried[0])} is used")
        print("PYTHON_INCLUDE=" + os.path.abspath(os.path.dirname(carried[0])))
    else:
        missing.append(f"Python.h (not in {inc}): Triton compiles its launchers against it")
want = re.search(r"cmake_minimum_required\(VERSION ([\d.]+)", open("CMakeLists.txt").read()).group(1)
cmake = shutil.which("cmake")
if cmake is None:
    missing.append(f"cmake >= {want} (the CUDA library's build)")
else:
    have = re.search(r"version ([\d.]+)", subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout)
    if have is None or version(have.group(1)) < version(want):
        missing.append(f"cmake >= {want} (found {have.group(1) if have else 'no version'})")
if shutil.which("nvcc") is None:
    notes.append("nvcc missing: no CUDA library (preprocessing runs in torch)")
if importlib.util.find_spec("torch") and importlib.util.find_spec("triton"):
    import torch, triton
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    stamp = f"{carry}/triton-cache.version"
    if os.path.exists(stamp) and open(stamp).read().split()[0] != triton.__version__:
        notes.append(f"the carried Triton cache is for triton {open(stamp).read().split()[0]}, not "
                     f"{triton.__version__}: every kernel compiles here")
    if not torch.cuda.is_available():
        (notes if os.environ.get("REHEARSE") else missing).append("a visible CUDA GPU (torch.cuda.is_available())")
    else:
        print(f"GPU: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}")
for n in notes:
    print(f"note: {n}")
if missing:
    print("MISSING (nothing was run):\n" + "\n".join(f"  - {m}" for m in missing))
    sys.exit(2)
print("preflight ok")
EOF
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { note "preflight failed (exit $rc)"; cp "$LOG" "$OUT/"; exit 2; }
INC=$(grep -m1 '^PYTHON_INCLUDE=' "$LOG" | cut -d= -f2-)
[ -n "$INC" ] && export C_INCLUDE_PATH="$INC${C_INCLUDE_PATH:+:$C_INCLUDE_PATH}"

note "installing the carried wheels into $SITE and the checkout (editable, with the CUDA library)"
rm -rf "$SITE"
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$CARRY"/wheels/*.whl \
    >>"$LOG" 2>&1 || { note "wheel install failed (see device.log)"; tail -20 "$LOG"; cp "$LOG" "$OUT/"; exit 1; }
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
  || { note "editable install failed (see device.log)"; tail -30 "$LOG"; cp "$LOG" "$OUT/"; exit 1; }
"$PY" -c "import open_clip, segment_anything, webdataset, pycocotools, fastsamclip.kernels" >>"$LOG" 2>&1 \
  || { note "imports fail after the install"; tail -20 "$LOG"; cp "$LOG" "$OUT/"; exit 1; }
note "installed"

export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fastsamclip-triton-cache}"
if [ -f "$CARRY/triton-cache.tar.gz" ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar xzf "$CARRY/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR"
  note "Triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) entries unpacked into $TRITON_CACHE_DIR ($(cat "$CARRY/triton-cache.version" 2>/dev/null))"
fi
[ -f "$CARRY/commit" ] && export FASTSAMCLIP_COMMIT="$(cat "$CARRY/commit")"

if [ "$MODE" = "--rehearse" ]; then
  note "rehearsal: the plan only"
  "$PY" -m fastsamclip bench gpu --dry-run 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  note "rehearsed: preflight, wheels, editable install ($(ls kernels/lib 2>/dev/null | head -1 || true)), Triton cache, plan (exit $rc)"
  cp "$LOG" "$OUT/"
  exit "$rc"
fi

note "fastsamclip bench gpu --out $RUN/results"
# The kit ends itself within its budget; the timeout only guards the packing below against a hang.
timeout -k 10 480 "$PY" -m fastsamclip bench gpu --out "$RUN/results" >"$RUN/bench-gpu.log" 2>&1
rc=$?
note "bench gpu exit $rc; packing"
cp "$LOG" "$RUN/results/" 2>/dev/null
tar czf "$OUT/fastsamclip-gpu.tar.gz" --exclude=results/fastsamclip-gpu.tar.gz -C "$RUN" results bench-gpu.log
cp "$RUN/results/summary.md" "$OUT/" 2>/dev/null
ls -la "$OUT"
grep -v '^\[bench gpu\]' "$RUN/bench-gpu.log" | tail -c 9000
grep '^\[bench gpu\]' "$RUN/bench-gpu.log"
exit "$rc"
