"""``fastsamclip serve``: the merged model behind an HTTP API with dynamic batching (LitServe).

    fastsamclip serve --checkpoint merged.safetensors --host 127.0.0.1 --port 8000
    FASTSAMCLIP_API_KEY=... fastsamclip serve --checkpoint merged.safetensors --host 0.0.0.0

Routes, bodies and answers: :mod:`fastsamclip.serve.app` and the README's "Serve" section; the
page at ``/`` (open http://127.0.0.1:8000/ in a browser). ``--devices N --workers-per-device K``:
N x K model workers, each with its own copy of the model and its own batches.
Listening beyond this machine (``--host 0.0.0.0`` or ``::``) lets anyone on the network call the
model: it needs an API key (``--api-key``, or the environment's ``FASTSAMCLIP_API_KEY`` or
LitServe's ``LIT_SERVER_API_KEY``; the variable keeps it out of ``ps``), or ``--insecure`` to
serve without one. SIGTERM or SIGINT (Ctrl-C) stop it with all its processes, in seconds.
"""

from __future__ import annotations

import os

from fastsamclip.cli.common import one_line_errors
from fastsamclip.errors import InputError, check_range
from fastsamclip.predictor.engine import check_device
from fastsamclip.serve import Limits, serve

KEY_VARIABLES = ("FASTSAMCLIP_API_KEY", "LIT_SERVER_API_KEY")
LOOPBACK = ("127.0.0.1",)


def api_key(args):
    """The key from the flag, else from the environment; None without one."""
    for key in (args.api_key, *(os.environ.get(v) for v in KEY_VARIABLES)):
        if key is not None:
            if not key.strip():
                raise InputError("the API key is empty: give a non-empty --api-key (or FASTSAMCLIP_API_KEY)")
            return key
    return None


@one_line_errors("serve", (ValueError, RuntimeError, OSError))  # CheckpointError: a ValueError
def cmd_serve(args) -> int:
    check_range("--port", args.port, 1024, 65535, integer=True)  # LitServe's range
    check_range("--max-batch-size", args.max_batch_size, 1, integer=True)
    check_range("--batch-timeout-ms", args.batch_timeout_ms, 0.0)
    check_range("--max-request-mb", args.max_request_mb, 1, integer=True)
    check_range("--max-image-mp", args.max_image_mp, 0.0, lo_open=True)
    check_range("--timeout", args.timeout, 0.0, lo_open=True)
    check_range("--devices", args.devices, 1, integer=True)
    check_range("--workers-per-device", args.workers_per_device, 1, integer=True)
    check_range("--image-cache", args.image_cache, 1, integer=True)
    if args.device != "auto":
        check_device(args.device)
    key = api_key(args)
    if args.host not in LOOPBACK and key is None and not args.insecure:
        raise InputError(f"--host {args.host} lets every machine that reaches this one call the model: give an API "
                         "key (FASTSAMCLIP_API_KEY=... or --api-key KEY; clients send it as X-API-Key), or pass "
                         "--insecure to serve without one")
    limits = Limits(max_request_bytes=args.max_request_mb * 2**20, max_image_pixels=int(args.max_image_mp * 1e6))
    print(f"fastsamclip serve: loading {args.checkpoint}; ready when GET http://{args.host}:{args.port}/ready "
          f"answers 200{' (with the X-API-Key header)' if key else ''}", flush=True)
    serve(args.checkpoint, host=args.host, port=args.port, log_level=args.log_level,
          max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1e3, device=args.device,
          compile=args.compile, limits=limits, timeout=args.timeout, api_key=key, devices=args.devices,
          workers_per_device=args.workers_per_device, image_cache=args.image_cache)
    return 0
