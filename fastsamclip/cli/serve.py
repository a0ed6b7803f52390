"""``fastsamclip serve``: the merged model behind an HTTP API with dynamic batching (LitServe).

    fastsamclip serve --checkpoint merged.safetensors --host 127.0.0.1 --port 8000

Routes, bodies and answers: :mod:`fastsamclip.serve.app` and the README's "Serve" section.
"""

from __future__ import annotations

from fastsamclip.cli.common import one_line_errors
from fastsamclip.serve import Limits, serve


@one_line_errors("serve", (ValueError, RuntimeError, OSError))  # CheckpointError: a ValueError
def cmd_serve(args) -> int:
    if args.max_batch_size < 1 or args.batch_timeout_ms < 0:
        raise ValueError("--max-batch-size must be >= 1 and --batch-timeout-ms >= 0")
    limits = Limits(max_request_bytes=args.max_request_mb * 2**20, max_image_pixels=int(args.max_image_mp * 1e6))
    print(f"fastsamclip serve: loading {args.checkpoint}; ready when GET http://{args.host}:{args.port}/ready "
          "answers 200", flush=True)
    serve(args.checkpoint, host=args.host, port=args.port, log_level=args.log_level,
          max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1e3, device=args.device,
          compile=args.compile, limits=limits, timeout=args.timeout)
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="HTTP API with dynamic batching: embeddings, labels, masks, semantic maps, segment everything",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("--checkpoint", required=True, help="merged .safetensors checkpoint")
    s.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                   help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests that may share one batch (default 8)")
    s.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long the worker waits to fill a batch (default 10 ms)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone per shape (batches padded to powers of two, all compiled at start)")
    s.add_argument("--max-request-mb", type=int, default=64, help="largest request body (MiB)")
    s.add_argument("--max-image-mp", type=float, default=40.0, help="largest decoded image (megapixels)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait before a 504")
    s.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    s.set_defaults(fn=cmd_serve)
