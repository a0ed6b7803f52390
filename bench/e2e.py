"""End to end: the merged model against SAM + CLIP run separately, on the same images.

    python -m bench.e2e                       # GPU defaults: SAM vit_b @1024, ViT-B-16 / ViT-L-14 @224
    python -m bench.e2e --quick               # tiny models on the CPU, for CI
    python -m bench.e2e --quick --profile merged-fused

Configurations (the ``impl`` column), each at one precision (the ``dtype`` in ``extra``):

- ``separate-eager/<clip>``: ``segment_anything`` SAM image encoder at its native size, then the
  open_clip image encoder at its own size, one after the other, as users run them today; fp32
  and bf16.
- ``separate-strong/<clip>``: the same in bf16 under ``torch.compile``, with SAM's attention
  through ``F.scaled_dot_product_attention`` and its relative-position bias as the mask (what
  segment-anything-fast does); open_clip's attention already runs through SDPA.
- ``separate-fused/<clip>``: SAM's image encoder with SAM's weights on fastsamclip's backbone and
  kernels (the automatic attention backend), then CLIP: the strongest separate pipeline there is,
  so that a merged row's lead over it is the merging's, not the kernels'.
- ``merged-reference``: the merged model, eager, attention backend ``reference`` (plain torch).
- ``merged-fused``: the merged model, eager, automatic attention backend (fused kernels).
- ``merged-fused-compile``: the same under ``torch.compile``.
- ``merged-fused-pool<k>``, ``merged-fused-compile-pool<k>``: the CLIP head on the backbone's
  tokens pooled k x k (``--clip-token-pools``, default 2 and 4), the SAM embedding unchanged.
- ``separate-samfast/<clip>`` (only when asked for with ``--impls``): segment-anything-fast's
  image encoder (the PyTorch team's package, installed from its git source; the PyPI project of
  that name is another one, FastSAM) with SAM's weights, bf16, compiled (Inductor's default mode,
  not its max-autotune, to keep compile time bounded), then CLIP as in ``separate-strong``.
  Skipped, with the reason, when the package is not importable or has no such SAM config.

``--impls`` picks and orders rows (``impl`` or ``impl@dtype``), ``--rows`` rows of several workloads
in one order (``workload:impl[@dtype]``); ``--dtype`` is the precision of
the fused rows (auto: bf16 on CUDA and on a CPU with native bf16, ``kernels.native_bf16``, else
fp32). Rows are written to the CSV as they are measured.

FLOPs: each row carries ``gflop_per_img``, the matrix products, convolutions and attention of
one image of its pipeline counted by ``torch.utils.flop_counter`` on meta tensors (no compute;
resizes and elementwise work are not counted), so ``img/s`` beside it tells work from efficiency.

Workloads (``mode``): ``both`` (SAM embedding + CLIP embedding per image), ``sam``, ``clip``;
and ``semantic`` (``bench.e2e_semantic``): one picture segmented into 20 labels by the merged
predictor's composed mode against SAM's automatic mask generator + CLIP on every mask's box crop.
Per row: img/s, p50 (``ms``) and p99 latency per batch, peak CUDA memory, weight bytes on the
device, energy per image from NVML power samples (or why not), and agreement: the maximum over
outputs of ``max|out - ref| / max|ref|`` against the eager fp32 row of the same model on the
same images (``separate-eager`` fp32 for separate rows, ``merged-reference`` fp32 for merged
rows). Latency: CUDA events around each batch, synchronised after it (the wall clock on the
CPU), after warm-up (compile happens in the warm-up). Weights are random unless checkpoints are
given. Rows are appended to ``bench/results/e2e.csv``; one plot per workload (img/s vs batch) is
written next to it, and the claims of the product are checked on this run (``bench.report``).
``--compare REF`` prints img/s against an earlier run (a CSV file or a commit in the CSV).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import get_rel_pos as sam_get_rel_pos
from torch.profiler import ProfilerActivity
from torch.profiler import profile as tprofile
from torch.utils.flop_counter import FlopCounterMode

from fastsamclip.checkpoint import load_merged
from fastsamclip.data import samples
from fastsamclip.kernels import use_backend
from fastsamclip.modeling import build_backbone, load_clip_teacher, load_sam_teacher, sam_preprocess, samclip_from_teachers
from fastsamclip.predictor.engine import resolve_dtype

from .e2e_semantic import semantic_rows
from .harness import (RESULTS_DIR, Result, append_csv, compare, earlier_rows, environment, format_extras, format_table,
                      full_size_device, measure_batches, nbytes, percentile, pyplot, read_csv, scratch_dir, sync)
from .report import markdown, pool_of, run_rows

WORKLOADS = ("both", "sam", "clip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A row that cannot be measured here for a reason that is not a failure (a missing package)."""


# ------------------------------------------------------------------------------------ models
class Models:
    """Everything the rows need, built once (fp32, on the device); rows take copies."""

    def __init__(self, sam, clips: Dict[str, object], merged, sam_size: int):
        self.sam = sam  # segment_anything.Sam
        self.clips = clips  # name -> CLIPTeacher
        self.merged = merged  # SAMCLIP
        self.sam_size = sam_size


def build_models(args, device: torch.device, tmp: str) -> Models:
    if args.quick:
        # The tiny teachers in their official formats: same code paths as the real ones.
        sam_ckpt = args.sam_checkpoint or samples.write_sam_checkpoint(os.path.join(tmp, "sam.pth"), args.sam_type)
        clip_names = [samples.write_clip_local_dir(os.path.join(tmp, "clip"))]
        pretrained = [None]
    else:
        sam_ckpt = args.sam_checkpoint
        clip_names = args.clip_model
        pretrained = args.clip_pretrained or [None] * len(clip_names)
        if len(pretrained) != len(clip_names):
            raise SystemExit("--clip-pretrained must be given once per --clip-model")
    torch.manual_seed(0)
    sam = load_sam_teacher(sam_ckpt, args.sam_type) if sam_ckpt else samples.random_sam(args.sam_type)
    clips = {}
    for name, pre in zip(clip_names, pretrained):
        short = "tiny-clip" if name.startswith("local-dir:") else name
        clips[short] = load_clip_teacher(name, pre if pre not in ("", "none") else None)
    if args.merged:
        merged = load_merged(args.merged, "cpu")
    else:
        # The merged model's CLIP head predicts the last (largest) CLIP's embedding and carries its
        # text tower, as the paper's student does.
        merged = samclip_from_teachers(sam, list(clips.values())[-1], sam_config=args.sam_type)
    sam_size = int(sam.image_encoder.img_size)
    # Image rows never use the text tower; keeping it out of the model saves copying a
    # vocabulary-sized embedding for every bf16 row (0.7 s a copy with the tiny CLIP).
    merged_text = merged.text
    merged.text = None
    models = Models(sam.to(device).eval(), {k: v.to(device).eval() for k, v in clips.items()},
                    merged.to(device).eval(), sam_size)
    models.merged_text = merged_text.to(device) if merged_text is not None else None
    # Quick mode writes random teachers to disk: weights are random unless the user gave some.
    models.random_sam = args.sam_checkpoint is None
    models.sam_type = args.sam_type
    models.clip_token_pools = args.clip_token_pools
    models.flops = {}  # (pipeline, workload) -> GFLOP per image
    models.meta = None  # the same models on the meta device, for counting FLOPs
    return models


def meta_models(models: Models) -> Models:
    """The models as meta tensors (shapes only), built once: FLOPs are counted on them."""
    if models.meta is None:
        meta = Models(copy.deepcopy(models.sam).to("meta"), {k: copy.deepcopy(v).to("meta") for k, v in models.clips.items()},
                      copy.deepcopy(models.merged).to("meta"), models.sam_size)
        meta.sam_type = models.sam_type
        models.meta = meta
    return models.meta


def gflop_per_image(models: Models, impl: str, workload: str):
    """GFLOP of one image of the row's pipeline (the model's arithmetic: every implementation of
    a pipeline does the same work), counted once per pipeline on meta tensors; or why not."""
    merged = impl.startswith("merged")
    key = (("merged", pool_of(impl)) if merged else ("separate", impl.split("/", 1)[1]), workload)
    if key not in models.flops:
        try:
            meta = meta_models(models)
            if merged:
                fn, _ = merged_fn(meta, workload, torch.float32, pool_of(impl))
            else:
                fn, _ = separate_fn(meta, key[0][1], workload, torch.float32)
            x = torch.empty(1, 3, models.sam_size, models.sam_size, device="meta")
            with FlopCounterMode(display=False) as counter, torch.no_grad(), use_backend("reference"):
                fn(x)
            models.flops[key] = round(counter.get_total_flops() / 1e9, 3)
        except Exception as e:  # a pipeline the meta device cannot trace: say so in the row
            models.flops[key] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return models.flops[key]


# ------------------------------------------------------------------------------------ row functions
def _as_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The fp32 module itself, or a copy in ``dtype`` (the shared fp32 weights stay intact)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


def _sam_attention_sdpa(self, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything``'s ``Attention.forward`` with the softmax through SDPA: the decomposed
    relative-position bias, computed as upstream does, is added as SDPA's float mask."""
    B, H, W, _ = x.shape
    nh = self.num_heads
    q, k, v = self.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, d)
    bias = None
    if self.use_rel_pos:
        r_q = q.reshape(B * nh, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, sam_get_rel_pos(H, H, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, sam_get_rel_pos(W, W, self.rel_pos_w))
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, H * W, H * W)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))


def sam_encoder_with_sdpa(encoder: torch.nn.Module, copy_first: bool = True) -> torch.nn.Module:
    """A ``segment_anything`` image encoder (a copy, unless ``copy_first=False``) whose attention
    runs through SDPA; the parameters and their names are unchanged."""
    if copy_first:
        encoder = copy.deepcopy(encoder)
    for m in encoder.modules():
        if isinstance(m, SamAttention):
            m.forward = types.MethodType(_sam_attention_sdpa, m)
    return encoder


def sam_fast_encoder(models: Models, dtype: torch.dtype) -> torch.nn.Module:
    """segment-anything-fast's image encoder with the SAM teacher's weights, in ``dtype``."""
    try:
        # Optional baseline: the PyTorch team's package, installed from its git source.
        import segment_anything_fast
        registry = segment_anything_fast.sam_model_registry
    except Exception as e:  # not installed, the PyPI namesake (FastSAM), or a failing import
        raise Skip(f"segment_anything_fast (github.com/pytorch-labs/segment-anything-fast) not importable: "
                   f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
    if models.sam_type not in registry:
        raise Skip(f"segment_anything_fast has no {models.sam_type!r} config")
    fast = registry[models.sam_type]()
    fast.image_encoder.load_state_dict(models.sam.image_encoder.state_dict())
    device = next(models.sam.parameters()).device
    return fast.image_encoder.to(device=device, dtype=dtype).eval()


def sam_fused_encoder(models: Models, dtype: torch.dtype) -> torch.nn.Module:
    """SAM's image encoder, SAM's weights, on fastsamclip's backbone (and so its kernels)."""
    enc = build_backbone(models.sam_type)
    enc.load_state_dict(models.sam.image_encoder.state_dict())
    return enc.to(device=next(models.sam.parameters()).device, dtype=dtype).eval()


def separate_fn(models: Models, clip_name: str, workload: str, dtype: torch.dtype, sdpa: bool = False,
                sam_fast: bool = False, fused: bool = False
                ) -> Tuple[Callable[[torch.Tensor], Dict[str, torch.Tensor]], List[torch.nn.Module]]:
    """SAM then CLIP, each with its own preprocessing, as two separate models are used."""
    if sam_fast:
        sam_enc = sam_fast_encoder(models, dtype)
    elif fused:
        sam_enc = sam_fused_encoder(models, dtype)
    else:
        sam_enc = _as_dtype(models.sam.image_encoder, dtype)
    if sdpa:  # patch a copy, never the shared fp32 encoder
        sam_enc = sam_encoder_with_sdpa(sam_enc, copy_first=sam_enc is models.sam.image_encoder)
    clip = _as_dtype(models.clips[clip_name], dtype)

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        if workload in ("both", "sam"):
            out["sam"] = sam_enc(sam_preprocess(models.sam, images).to(dtype))
        if workload in ("both", "clip"):
            out["clip"] = clip.model.encode_image(models.clips[clip_name].preprocess(images).to(dtype))
        return out

    used = ([sam_enc] if workload != "clip" else []) + ([clip.model.visual] if workload != "sam" else [])
    return run, used


def merged_fn(models: Models, workload: str, dtype: torch.dtype, pool: int = 1):
    model = _as_dtype(models.merged, dtype)
    clip, sam = workload in ("both", "clip"), workload in ("both", "sam")

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return model(model.preprocess(images).to(dtype), clip=clip, sam=sam, clip_token_pool=pool)

    # Weights a deployment of this workload holds: the text tower is not used by image embedding,
    # the CLIP head not by a SAM-only deployment.
    used = [model.image_encoder] + ([model.clip_head] if clip else [])
    return run, used


def make_row_fn(models: Models, impl: str, workload: str, dtype: torch.dtype, compile_backend: str):
    """(callable(images) -> outputs, modules on the device, attention backend or None)."""
    if impl.startswith("separate-"):
        kind, clip_name = impl.split("/", 1)
        fn, used = separate_fn(models, clip_name, workload, dtype, sdpa=kind == "separate-strong",
                               sam_fast=kind == "separate-samfast", fused=kind == "separate-fused")
        if kind in ("separate-strong", "separate-samfast"):
            fn = torch.compile(fn, dynamic=False, backend=compile_backend)
        return fn, used, None
    fn, used = merged_fn(models, workload, dtype, pool_of(impl))
    if impl.startswith("merged-fused-compile"):
        fn = torch.compile(fn, dynamic=False, backend=compile_backend)
    return fn, used, ("reference" if impl == "merged-reference" else None)


def rel_err(out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    """max over outputs of max|out - ref| / max|ref| (scale-free, no division by tiny entries)."""
    errs = []
    for k, r in ref.items():
        o, r = out[k].float(), r.float()
        errs.append(((o - r).abs().max() / r.abs().max().clamp_min(1e-12)).item())
    return max(errs)


def run_row(models: Models, impl: str, dtype_name: str, workload: str, images: torch.Tensor,
            refs: Dict[Tuple[str, str, int], Dict[str, torch.Tensor]], args, device: torch.device) -> Result:
    b = images.shape[0]
    case = f"{workload} B{b}"
    extra = {"dtype": dtype_name, "batch": b}
    r = Result(bench="e2e", case=case, impl=impl, mode=workload, extra=extra)
    try:
        fn, used, backend = make_row_fn(models, impl, workload, DTYPES[dtype_name], args.compile_backend)
        with use_backend(backend):
            out, times, total, peak, power = measure_batches(fn, images, device, args.warmup, args.iters)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        r.status = "failed: out of memory"
        return r
    except Skip as e:
        r.status = f"skipped: {e}"
        return r
    except Exception as e:  # a configuration that breaks is a row with its error, not a crash
        r.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return r
    p50 = statistics.median(times)
    p99 = percentile(times, 0.99)
    r.ms, r.peak_mem_mb = p50, peak
    extra["img_s"] = round(b * len(times) / total, 3)
    extra["p99_ms"] = round(p99, 3)
    extra["weight_mb"] = round(nbytes(used) / 2**20, 3)
    joules = power.joules(total)
    extra["j_per_img"] = round(joules / (b * len(times)), 5) if joules is not None else (
        power.reason or "n/a: too few power samples")
    pool = pool_of(impl) if impl.startswith("merged") else 1
    family = (f"merged-pool{pool}" if pool > 1 else "merged") if impl.startswith("merged") else impl.split("/", 1)[1]
    key = (family, workload, b)
    if dtype_name == "fp32" and (impl == "merged-reference" or impl.startswith("separate-eager")):
        refs[key] = out  # the eager fp32 row of each model is the reference of the rows after it
    if key not in refs and pool > 1:  # the pooled path's own reference: eager, plain torch, fp32
        with torch.no_grad(), use_backend("reference"):
            refs[key] = merged_fn(models, workload, torch.float32, pool)[0](images)
    extra["max_rel_err"] = f"{rel_err(out, refs[key]):.3g}" if key in refs else "n/a: reference row failed"
    extra["gflop_per_img"] = gflop_per_image(models, impl, workload)
    if "compile" in impl or impl.startswith(("separate-strong", "separate-samfast")):
        extra["compile_backend"] = args.compile_backend
    return r


def configurations(models: Models, fast_dtype: str) -> List[Tuple[str, str]]:
    """(impl, dtype) in order: each family's eager fp32 reference first (agreement needs it)."""
    rows = []
    for clip_name in models.clips:
        rows += [(f"separate-eager/{clip_name}", "fp32"), (f"separate-eager/{clip_name}", "bf16"),
                 (f"separate-strong/{clip_name}", "bf16"), (f"separate-fused/{clip_name}", fast_dtype)]
    rows += [("merged-reference", "fp32"), ("merged-reference", "bf16"), ("merged-fused", fast_dtype)]
    rows += [(f"merged-fused-pool{k}", fast_dtype) for k in models.clip_token_pools]
    rows += [("merged-fused-compile", fast_dtype)]
    rows += [(f"merged-fused-compile-pool{k}", fast_dtype) for k in models.clip_token_pools]
    return rows


def catalog(models: Models, fast_dtype: str) -> List[Tuple[str, str]]:
    """Every row ``--impls`` may ask for: the default configurations, then segment-anything-fast."""
    return configurations(models, fast_dtype) + [(f"separate-samfast/{c}", "bf16") for c in models.clips]


def select_rows(models: Models, fast_dtype: str, spec: Optional[str]) -> List[Tuple[str, str]]:
    """The rows of ``--impls`` ("impl" for all of its precisions, or "impl@dtype"), in that order;
    the default configurations without it. Unknown names raise ValueError listing the known ones."""
    if not spec:
        return configurations(models, fast_dtype)
    known = catalog(models, fast_dtype)
    out: List[Tuple[str, str]] = []
    for item in (x for x in spec.split(",") if x):
        impl, _, dtype = item.partition("@")
        rows = [(i, d) for i, d in known if i == impl and (not dtype or d == dtype)]
        if dtype and not rows and any(i == impl for i, _ in known) and dtype in DTYPES:
            rows = [(impl, dtype)]
        if not rows:
            raise ValueError(f"--impls: unknown row {item!r}; known: "
                             f"{', '.join(dict.fromkeys(f'{i}@{d}' for i, d in known))}")
        out += [r for r in rows if r not in out]
    return out


# ------------------------------------------------------------------------------------ plots, profile
def plot_workloads(results: List[Result], folder: str) -> List[str]:
    """One PNG per workload: img/s vs batch size, one line per (impl, dtype)."""
    plt = pyplot()
    if plt is None:
        return []
    os.makedirs(folder, exist_ok=True)
    paths = []
    for workload in WORKLOADS:
        if not any(r.mode == workload for r in results):
            continue  # not asked for in this run
        rows = [r for r in results if r.mode == workload and r.status == "ok"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines: Dict[str, List[Tuple[int, float]]] = {}
        for r in rows:
            lines.setdefault(f"{r.impl} {r.extra['dtype']}", []).append((r.extra["batch"], r.extra["img_s"]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"e2e '{workload}'" + ("" if rows else " (no successful rows)"))
        if lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, f"e2e_{workload}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def profile(models: Models, impl: str, dtype_name: str, images: torch.Tensor, args, device: torch.device) -> str:
    fn, _, backend = make_row_fn(models, impl, "both", DTYPES[dtype_name], args.compile_backend)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), use_backend(backend):
        for _ in range(max(1, args.warmup)):  # compile outside the trace
            fn(images)
        sync(device)
        with tprofile(activities=activities) as prof:
            for _ in range(3):
                fn(images)
            sync(device)
    path = args.trace or os.path.join(RESULTS_DIR, f"e2e_trace_{impl.replace('/', '_')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    prof.export_chrome_trace(path)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"trace written to {path}")
    return path


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, batch 1,2, few iterations")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8,32; quick 1,2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--sam-type", default=None, help="SAM config (default vit_b; quick vit_tiny)")
    p.add_argument("--sam-checkpoint", default=None)
    p.add_argument("--clip-model", action="append", default=None, help="open_clip name (repeatable)")
    p.add_argument("--clip-pretrained", action="append", default=None, help="tag or file per --clip-model")
    p.add_argument("--merged", default=None, help="merged .safetensors (default: built from the teachers)")
    p.add_argument("--dtype", "--fast-dtype", dest="fast_dtype", default="auto", choices=["auto"] + list(DTYPES),
                   help="precision of the fused rows (auto: bf16 on CUDA and on a CPU with native bf16, else fp32); "
                        "each row's agreement with the eager fp32 row of its pipeline is in max_rel_err")
    p.add_argument("--clip-token-pools", default="2,4",
                   help="token-pool factors of the pooled-CLIP-head rows (merged-fused-pool<k>); '' for none")
    p.add_argument("--impls", default=None,
                   help="comma-separated rows to run, in this order: impl or impl@dtype (e.g. "
                        "merged-reference@fp32,merged-fused-compile,separate-samfast/ViT-B-16); default: every "
                        "configuration but segment-anything-fast")
    p.add_argument("--rows", default=None,
                   help="comma-separated workload:impl[@dtype] items, run in exactly this order at each batch size "
                        "(e.g. both:merged-fused,sam:merged-fused-compile); instead of --workloads and --impls")
    p.add_argument("--compile-backend", default=None, help="default inductor; quick: eager (fast to trace)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/e2e.csv)")
    p.add_argument("--plot-dir", default=None, help="where the plots go (default: next to the CSV)")
    p.add_argument("--no-semantic", action="store_true", help="skip the semantic-segmentation workload")
    p.add_argument("--points-per-side", type=int, default=None, help="SAM AMG grid (default 32; quick 4)")
    p.add_argument("--profile", default=None, metavar="ROW_NAME", help="trace one configuration (impl name)")
    p.add_argument("--profile-dtype", default=None, choices=list(DTYPES))
    p.add_argument("--trace", default=None, help="Chrome trace path for --profile")
    p.add_argument("--compare", default=None, metavar="REF",
                   help="print img/s against an earlier run: a results CSV, or a commit id found in --out's CSV")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q = args.quick
    device = torch.device(full_size_device(p, args.device, q))
    args.sam_type = args.sam_type or ("vit_tiny" if q else "vit_b")
    args.clip_model = args.clip_model or ["ViT-B-16", "ViT-L-14"]
    args.batch = [int(x) for x in (args.batch or ("1,2" if q else "1,8,32")).split(",")]
    args.iters = args.iters or (3 if q else 30)
    args.warmup = args.warmup or (1 if q else 3)
    args.compile_backend = args.compile_backend or ("eager" if q else "inductor")
    args.points_per_side = args.points_per_side or (4 if q else 32)
    # auto: the predictor's own choice for this device (bf16 on CUDA and on a native-bf16 CPU)
    fast_dtype = args.fast_dtype if args.fast_dtype != "auto" else (
        "bf16" if resolve_dtype("auto", device) == torch.bfloat16 else "fp32")
    try:
        args.clip_token_pools = tuple(int(k) for k in args.clip_token_pools.split(",") if k)
    except ValueError:
        args.clip_token_pools = (0,)
    if any(k < 2 for k in args.clip_token_pools):
        p.error(f"--clip-token-pools {args.clip_token_pools}: comma-separated integers >= 2 (e.g. 2,4), or ''")
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    ordered = [item.partition(":") for item in (args.rows or "").split(",") if item]
    for w, colon, impl in ordered:
        if not colon or w not in WORKLOADS or not impl:
            p.error(f"--rows: {w + colon + impl!r} is not workload:impl[@dtype] with a workload among "
                    f"{', '.join(WORKLOADS)}")

    out_csv = args.out or os.path.join(RESULTS_DIR, "e2e.csv")
    before = earlier_rows(args.compare, out_csv) if args.compare else None  # read before this run appends

    tmp = scratch_dir("fastsamclip-e2e-")
    models = build_models(args, device, tmp)
    g = torch.Generator(device="cpu").manual_seed(0)
    # Random pixels 0-255 at SAM's native size; every row of a batch size sees the same images.
    images = {b: (torch.rand(b, 3, models.sam_size, models.sam_size, generator=g) * 255).to(device)
              for b in args.batch}

    if args.profile:
        known = [impl for impl, _ in configurations(models, fast_dtype)]
        if args.profile not in known:
            p.error(f"--profile: unknown row {args.profile!r}; known: {', '.join(dict.fromkeys(known))}")
        # Default: the row's first precision in the table (fp32 for the eager rows).
        dtype = args.profile_dtype or next(d for i, d in configurations(models, fast_dtype) if i == args.profile)
        profile(models, args.profile, dtype, images[args.batch[0]], args, device)
        return 0

    try:  # (workload, batch, impl, dtype) in the order they run
        if ordered:
            plan = [(w, b, i, d) for b in args.batch for w, _, spec in ordered
                    for i, d in select_rows(models, fast_dtype, spec)]
        else:
            rows = select_rows(models, fast_dtype, args.impls)
            plan = [(w, b, i, d) for w in workloads for b in args.batch for i, d in rows]
    except ValueError as e:
        p.error(str(e))
    results: List[Result] = []
    refs: Dict[Tuple[str, str, int], Dict[str, torch.Tensor]] = {}
    env = environment()  # one stamp for the run: its rows are appended as they are measured
    for workload, b, impl, dtype in plan:
        results.append(run_row(models, impl, dtype, workload, images[b], refs, args, device))
        append_csv(results[-1:], out_csv, env)
        torch._dynamo.reset()  # compiled graphs of one row must not serve (or evict) another's
    if not args.no_semantic:
        sem = semantic_rows(models, args, device)
        append_csv(sem, out_csv, env)
        results += sem
    path = out_csv
    plots = plot_workloads(results, args.plot_dir or os.path.dirname(os.path.abspath(path)))
    print(format_table(results))
    print()
    print(format_extras(results, [("dtype", "dtype"), ("img/s", "img_s"), ("p99 ms", "p99_ms"),
                                  ("weights MB", "weight_mb"), ("J/img", "j_per_img"), ("max rel err", "max_rel_err")]))
    print(f"appended {len(results)} rows to {path}; plots: {', '.join(plots) or 'none'}")
    print()
    print(markdown(run_rows(read_csv(path))))
    if before is not None:
        print()
        print(compare(results, before, metric="img_s", higher_is_better=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
