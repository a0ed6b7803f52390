#!/usr/bin/env bash
# A rehearsal of a lent GPU machine's first contact, on any Linux x86-64 machine that reaches PyPI,
# with the GPU machine's stack: Python 3.12, torch 2.11.0 (PyPI's CUDA 13 build), torchvision
# 0.26.0, triton 3.6.0, the packages that machine has, and the carried wheels installed as there.
# It also makes what a device call carries, .gpu-carry/ in this checkout (ignored by git):
# the wheels, an sm_90a Triton cache of the run's attention kernels built with that Triton, the
# commit, and Python's headers.
#
#   bash bench/gpu_rehearsal.sh [WORK]   # WORK: the cached virtualenv and scratch (default below)
#
# Idempotent: the virtualenv (several GB) is made once per requirement list and kept in WORK; the
# wheels are fetched once. Each run copies the working tree (tracked and untracked files that git
# does not ignore, and .gpu-carry: what a device call sends) to WORK/tree and, there:
#   1. bench/gpu_device.sh --rehearse (preflight, the wheels, the editable install with the CUDA
#      library, the Triton cache unpacked, `fastsamclip bench gpu --dry-run`);
#   2. `fastsamclip info --kernels` (every Triton kernel built for sm_90a and sm_80);
#   3. the autotuner tests (Triton's own autotune -> Autotuner.run -> pruner), which must also fail
#      with the pruner's old warmup call put back, and the kernel tests (Triton's interpreter; numpy
#      is pinned below 2.4 here only, which that interpreter needs);
#   4. the Triton cache checked: a copy warmed again compiles nothing (the GPU run would hit it).
# Then a table of what passed and the minutes each step took. Exit 1 if a step failed.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/fastsamclip-gpu-rehearsal}"
PY312="${PYTHON312:-}"
for c in python3.12 /root/.pyenv/versions/3.12*/bin/python /usr/local/bin/python3.12; do
  [ -n "$PY312" ] && break
  "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && PY312="$c"
done
[ -n "$PY312" ] || { echo "no Python 3.12 found: set PYTHON312=/path/to/python3.12"; exit 2; }
CARRY="$REPO/.gpu-carry"
REQS=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4" timm regex safetensors huggingface_hub tqdm
      pyyaml pillow scikit-image packaging pytest pytest-xdist pytest-timeout nvidia-ml-py cmake setuptools wheel
      matplotlib httpx)
VENV="$WORK/venv-py312"
mkdir -p "$WORK" "$CARRY"
STEPS=()

step() {  # step NAME COMMAND...: run it, log to WORK/logs/NAME.log, record status and minutes
  local name="$1"; shift
  local t0=$(date +%s) rc
  mkdir -p "$WORK/logs"
  echo "== $name"
  "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  local mins=$(awk "BEGIN {printf \"%.1f\", ($(date +%s) - $t0) / 60}")
  STEPS+=("$(printf '%-22s %-8s %5s min  %s' "$name" "$([ $rc = 0 ] && echo passed || echo "FAILED")" "$mins" \
                   "$(tail -n 1 "$WORK/logs/$name.log" | cut -c1-200)")")
  [ $rc = 0 ] || tail -n 25 "$WORK/logs/$name.log"
  return $rc
}

make_venv() {
  local stamp="$VENV/.requirements"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${REQS[*]}" ]; then
    echo "cached: $VENV ($("$VENV/bin/python" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'))"
    return 0
  fi
  rm -rf "$VENV" && "$PY312" -m venv "$VENV" && "$VENV/bin/python" -m pip install -q --upgrade pip \
    && "$VENV/bin/python" -m pip install -q "${REQS[@]}" && echo "${REQS[*]}" >"$stamp" \
    && "$VENV/bin/python" -c 'import sys, torch, triton, numpy; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__)'
}

fetch_wheels() {
  if [ "$(ls "$CARRY"/wheels/*.whl 2>/dev/null | wc -l)" -ge 7 ]; then
    echo "cached: $(ls "$CARRY"/wheels/*.whl | wc -l) wheels in $CARRY/wheels"; return 0
  fi
  PYTHON="$VENV/bin/python" bash "$REPO/bench/gpu_wheels.sh" "$CARRY/wheels"
}

stamp_carry() {  # the commit and Python's headers (a fallback where the GPU machine lacks Python.h)
  local c
  c=$(git -C "$REPO" rev-parse --short HEAD) || return 1
  git -C "$REPO" diff --quiet HEAD -- . ':(exclude)bench/results' || c="$c+dirty"
  echo "$c" >"$CARRY/commit"
  rm -rf "$CARRY/python-include" && mkdir -p "$CARRY/python-include"
  cp -r "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" "$CARRY/python-include/"
  echo "commit $(cat "$CARRY/commit"); headers $(ls "$CARRY/python-include")"
}

copy_tree() {  # what a device call sends: the working tree git sees, and the carried folder
  rm -rf "$WORK/tree" && mkdir -p "$WORK/tree"
  (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar cf - .gpu-carry) | tar xf - -C "$WORK/tree" \
    && echo "$(cd "$WORK/tree" && find . -type f | wc -l) files, $(du -sh "$WORK/tree" | cut -f1) (a device call takes 64 MiB)"
}

in_tree() { (cd "$WORK/tree" && PATH="$VENV/bin:$PATH" PYTHONPATH="$WORK/site" HF_HUB_OFFLINE=1 "$@"); }

warm_cache() {  # built in the tree (the carried source), with this triton: carried as a tarball
  rm -rf "$WORK/triton-cache" \
    && in_tree python -m fastsamclip bench gpu --warm-triton-cache "$WORK/triton-cache" \
    && tar czf "$CARRY/triton-cache.tar.gz" -C "$WORK/triton-cache" . \
    && "$VENV/bin/python" -c 'import triton; print(triton.__version__, "sm_90a")' >"$CARRY/triton-cache.version" \
    && echo "$(du -sh "$CARRY/triton-cache.tar.gz" | cut -f1) $CARRY/triton-cache.tar.gz"
}

check_cache() {  # a copy of the carried cache, warmed again from the tree: nothing may compile
  rm -rf "$WORK/cache-check" && mkdir -p "$WORK/cache-check" && tar xzf "$CARRY/triton-cache.tar.gz" -C "$WORK/cache-check" \
    && in_tree python -m fastsamclip bench gpu --warm-triton-cache "$WORK/cache-check" | tee "$WORK/cache-check.txt" \
    && grep -q ", 0 compiled into it now," "$WORK/cache-check.txt"
}

old_pruner_call() {  # the autotuner tests must fail with the pruner's old warmup call put back (a copy)
  local f="$WORK/tree/kernels/relpos_attention_triton.py" rc
  cp "$f" "$WORK/pruner.py.orig"
  sed -i 's/return fn.warmup(\*named_args.values(), grid=(1,), \*\*meta, \*\*cfg.all_kwargs())/return fn.warmup(grid=(1,), **named_args, **kwargs, **cfg.all_kwargs())/' "$f"
  if cmp -s "$f" "$WORK/pruner.py.orig"; then echo "the pruner's warmup call was not found"; return 1; fi
  in_tree python -m pytest -q -p no:cacheprovider tests/kernels/test_relpos_attention_triton.py \
    -k "pruner or autotuner or no_config_left or number_of_heads" --tb=line | grep -E "got multiple values|passed|failed"
  rc=${PIPESTATUS[0]}
  cp "$WORK/pruner.py.orig" "$f"
  [ "$rc" != 0 ] && echo "the old call fails them (as it must): exit $rc"
}

FAILED=0
step venv make_venv || { printf '%s\n' "${STEPS[@]}"; exit 1; }
step wheels fetch_wheels || FAILED=1
step carry-stamp stamp_carry || FAILED=1
step copy-tree copy_tree || FAILED=1
step device-script env PYTHON="$VENV/bin/python" FASTSAMCLIP_SITE_DIR="$WORK/site" FASTSAMCLIP_RUN_DIR="$WORK/run" \
  TRITON_CACHE_DIR="$WORK/device-triton-cache" bash "$WORK/tree/bench/gpu_device.sh" "$WORK/device-out" --rehearse \
  || FAILED=1
step info-kernels in_tree nice -n 10 fastsamclip info --kernels || FAILED=1
step pruner-tests in_tree python -m pytest -q -p no:cacheprovider tests/kernels/test_relpos_attention_triton.py \
  -k "pruner or autotuner or no_config_left or number_of_heads" || FAILED=1
step old-pruner-call old_pruner_call || FAILED=1
step kernel-tests in_tree nice -n 10 python -m pytest -q -p no:cacheprovider tests/kernels \
  --ignore=tests/kernels/test_aot.py || FAILED=1
step triton-cache warm_cache || FAILED=1
step triton-cache-hits check_cache || FAILED=1

echo
echo "Rehearsal of the GPU machine's stack in $WORK ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores):"
printf '%s\n' "${STEPS[@]}"
echo "logs: $WORK/logs; carried: $(du -sh "$CARRY" | cut -f1) in $CARRY"
exit $FAILED
