"""The HTTP server: LitServe, one model worker per device, dynamic batching across every endpoint.

Why LitServe: it is built for exactly this case, one model on one machine with requests batched
in a short window (``max_batch_size`` / ``batch_timeout``), the model in its own worker process
(so decoding and JSON never stall the GPU), readiness after the model's ``setup``, and FastAPI
underneath; Ray Serve would add a cluster runtime that only pays off when one deployment spans
machines.

Layout. One ``LitAPI`` holds the model (:class:`~fastsamclip.serve.engine.Engine`) and one
``LitSpec`` (:class:`Endpoints`) holds the routes, so that requests to EVERY endpoint join the
same queue and the same batches (LitServe gives each LitAPI its own worker and queue: one LitAPI
per endpoint would load the model once per endpoint and never batch across them). The routes run
in the HTTP process: read the body (size-limited), decode and validate
(:mod:`fastsamclip.serve.requests`; a bad request is answered there, a 4xx, and never reaches the
model), prepare the pixels, queue the task, wait for the answer.

Routes (JSON bodies, or multipart with ``image`` as a file; errors are ``{"error": message}``):

    GET  /                the page (:mod:`fastsamclip.serve.static`; its files are public, they hold no data)
    GET  /health          liveness: {"status": "alive", "ready": bool}
    GET  /ready           LitServe's readiness: 200 "ok" once the model is loaded and warmed, else 503
    GET  /info            the model and the batching settings
    POST /v1/embed        {"image", "sam": false}           -> clip_embedding (and sam_embedding)
    POST /v1/classify     {"image", "labels": [...]}        -> probs, label
    POST /v1/segment      {"image", "points"/"boxes", ...}  -> masks (COCO RLE), scores
    POST /v1/semantic     {"image", "labels": [...], "mode"} -> per-class masks (COCO RLE)
    POST /v1/everything   {"image", "labels"?, generator parameters} -> every mask (COCO RLE), named
    POST /v1/concepts     {"image", "phrases": [...], segment_text's parameters} -> every instance of each phrase
    POST /v1/image        {"image", "labels"?}              -> image_id: its pass kept (segment, everything,
                                                               concepts, composed semantic take image_id for image)

Every answer carries ``timings_ms`` (decode, queue, backbone, head, total) and ``batch``
(``requests`` in the worker's batch, ``backbone_batch`` images in this request's backbone pass).

Operations:

- API key: with one (``api_key``; the command takes ``--api-key`` or ``FASTSAMCLIP_API_KEY``),
  every route answers 401 unless the request sends it in the ``X-API-Key`` header (LitServe's
  header), checked in constant time through LitServe's ``LitAPI.authorize`` hook.
- ``timeout``: a request whose answer has not come after that many seconds in the queue gets its
  504 then, from the HTTP process, even while the worker is busy with a long batch.
- A client that goes away during its upload is one log line, not a traceback.
- Idle: the worker waits for the first request of a batch in a blocking read of the queue
  (:class:`WaitingBatchedLoop`); LitServe's own batched loop polls every millisecond forever.
- A checkpoint the worker cannot serve (damaged, answering NaN at warm-up) stops the start with
  one line naming why; the processes stop together (:mod:`fastsamclip.serve.processes`).
- Several model workers (``devices`` x ``workers_per_device``, LitServe's own options): each loads
  its own copy of the model and forms its own batches from the one queue; kept image passes are
  shared through a folder (:mod:`fastsamclip.serve.cache`). CPU workers split the cores between them.
- The model workers' OpenMP threads sleep between parallel regions (``OMP_WAIT_POLICY=PASSIVE``
  unless the environment sets it, :data:`WORKER_ENV`): spinning ones cost a hover 3-4x on shared cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from queue import Empty
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from fastsamclip import logs
from fastsamclip.checkpoint import read_merged_config
from fastsamclip.errors import InputError
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.serve.cache import PassCache
from fastsamclip.serve.engine import Engine
from fastsamclip.serve.processes import child_of_server, stop_children, stopping_on_signals
from fastsamclip.serve.requests import (
    JSON_TYPE,
    TASK_FIELDS,
    Geometry,
    Limits,
    RequestError,
    check_content_type,
    form_value,
    make_task,
    parse_json_body,
)

try:  # optional dependency (extra "serve"): the server needs it, the rest of fastsamclip does not
    import litserve as ls
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from litserve.loops.base import collate_requests
    from litserve.loops.simple_loops import BatchedLoop
    from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser

    MISSING: Optional[str] = None
    from litserve.specs.base import LitSpec

    _LitAPI, _LitSpec = ls.LitAPI, LitSpec
except ImportError as e:  # pragma: no cover - exercised where the extra is not installed
    MISSING = f"{e}; install the server with `pip install fastsamclip[serve]` (litserve)"
    _LitAPI = _LitSpec = BatchedLoop = object
    Request = Any

log = logging.getLogger("fastsamclip.serve")
TASKS = tuple(TASK_FIELDS)
ROUTE_PREFIX = "/v1"
READY_PATH = "/ready"
API_KEY_HEADER = "X-API-Key"  # LitServe's own header for its API key
IDLE_WAIT_S = 1.0  # the idle worker's blocking read of the queue (it wakes at once on a request)
SHUTDOWN_GRACE_S = 2.0  # uvicorn's graceful shutdown (LitServe's default: 30 s)
# The model workers' OpenMP threads sleep between parallel regions instead of spinning (libgomp's
# default spins for a while). The cores are shared (the HTTP process, other workers, other
# programs): a spinning thread takes the time slice the thread with the work needs, and every op
# of the mask decoder is a short parallel region. Measured on 2 shared cores (load average ~5,
# SAM's mask decoder at 1024 px, two threads): a hover 553-668 ms spinning, 153-168 ms passive
# (one thread 165-173 ms); the ViT-B backbone pass 20.3 s spinning, 15.3 s passive. An
# environment that sets the variable keeps its own value.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page loads nothing from elsewhere (the machines serving it may be offline) and runs no inline code.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                           "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
                "Cache-Control": "no-cache"}


def require_litserve() -> None:
    if MISSING is not None:
        raise RuntimeError(f"fastsamclip serve needs litserve: {MISSING}")


def error_response(status: int, message: str) -> "JSONResponse":
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: "Request", limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes is over this server's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_fields(request: "Request", limit: int) -> Dict[str, Any]:
    """The request's fields (``image`` as bytes or base64 text), from JSON or multipart."""
    kind = check_content_type(request.headers.get("content-type"))
    body = await read_body(request, limit)
    if kind == JSON_TYPE:
        return parse_json_body(body)

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=32,
                                     max_part_size=limit).parse()
    except MultiPartException as e:
        raise RequestError(400, f"cannot read the multipart body: {e.message}") from None
    fields: Dict[str, Any] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            fields[name] = await value.read()
        else:
            fields[name] = form_value(name, value)
    return fields


class _FirstThen:
    """A queue whose next ``get`` returns ``first``, then the queue's own items."""

    def __init__(self, first, queue) -> None:
        self.first, self.queue = [first], queue

    def get(self, block: bool = True, timeout: Optional[float] = None):
        return self.first.pop() if self.first else self.queue.get(block, timeout)

    def get_nowait(self):
        return self.get(block=False)


class WaitingBatchedLoop(BatchedLoop):
    """LitServe's batched loop, whose batch window opens when a request arrives: the idle worker
    blocks on the queue (a wake-up per :data:`IDLE_WAIT_S`) instead of LitServe's reads with a
    1 ms timeout, back to back, all the time (~13% of a core while idle, every read a round trip
    to the manager process). The batch is then collected by LitServe's own ``collate_requests``."""

    def get_batch_requests(self, lit_api, request_queue, transport):
        try:
            first = request_queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return [], []
        return collate_requests(self, lit_api, _FirstThen(first, request_queue), transport)


class Endpoints(_LitSpec):
    """The routes of the module docstring, all feeding one LitAPI's queue."""

    def __init__(self, limits: Limits, geometry: Geometry, info: Dict[str, Any], timeout: float = 60.0,
                 image_cache: int = 16) -> None:
        super().__init__()
        self.api_path = ROUTE_PREFIX  # the queue's name; the routes are added below
        self.limits, self.geometry, self.info, self.timeout = limits, geometry, info, timeout
        # Ids of the images the workers keep -> (H, W), so a request naming one is checked here. A
        # worker forgets the oldest first and so does this map; an id it forgot is the worker's 404.
        self.images: "OrderedDict[str, Tuple[int, int]]" = OrderedDict()
        self.image_cache = image_cache

    def pre_setup(self, lit_api) -> None:
        for task in TASKS:
            self.add_endpoint(f"{ROUTE_PREFIX}/{task}", getattr(self, f"post_{task}"), ["POST"])
        self.add_endpoint("/health", self.health, ["GET"])

    # LitSpec's hooks in the worker: the LitAPI below does the work.
    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request) -> "JSONResponse":
        status = getattr(self._server, "workers_setup_status", None) or {}
        ready = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        return JSONResponse({"status": "alive", "ready": ready})

    async def post_embed(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "embed")

    async def post_classify(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "classify")

    async def post_segment(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "segment")

    async def post_semantic(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "semantic")

    async def post_everything(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "everything")

    async def post_concepts(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "concepts")
    async def post_image(self, request: Request) -> "JSONResponse":
        return await self.handle(request, "image")

    async def handle(self, request: "Request", task_name: str) -> "JSONResponse":
        t0 = time.monotonic()
        try:
            fields = await read_fields(request, self.limits.max_request_bytes)
            task = await run_in_threadpool(make_task, task_name, fields, self.limits, self.geometry, self.images)
        except RequestError as e:
            return error_response(e.status, e.message)
        except ClientDisconnect:  # nobody to answer: one line in the log, not a traceback
            log.warning("a client went away during its %s upload (%s:%s)", task_name,
                     *(request.client or ("?", "?")))
            return Response(status_code=400)
        except Exception as e:  # noqa: BLE001 -- a request we cannot read is the client's 400, never a 500
            log.exception("reading a %s request failed", task_name)
            return error_response(400, f"cannot read the request: {type(e).__name__}: {e}")
        decode_ms = (time.monotonic() - t0) * 1e3
        task["submitted"] = time.monotonic()
        uid = str(uuid.uuid4())
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(), task))
        try:
            await asyncio.wait_for(event.wait(), self.timeout)
        except asyncio.TimeoutError:  # the worker is busy: answer now; its late answer is dropped
            self.response_buffer.pop(uid, None)
            return error_response(504, f"no answer within this server's timeout of {self.timeout:g} s (the model "
                                       "is busy); try again later")
        response, status = self.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR:
            code = getattr(response, "status_code", 500)
            return error_response(code, str(getattr(response, "detail", None) or response))
        answer = dict(response)
        timings = dict(answer.pop("timings_ms", {}), decode=decode_ms, total=(time.monotonic() - t0) * 1e3)
        if "error" in answer:
            return JSONResponse({"error": answer["error"], "timings_ms": timings, "batch": answer.get("batch")},
                                status_code=answer.get("status", 500))
        if task_name == "image":
            self.images[answer["result"]["image_id"]] = tuple(answer["result"]["size"])
            self.images.move_to_end(answer["result"]["image_id"])
            while len(self.images) > self.image_cache:
                self.images.popitem(last=False)
        return JSONResponse({**answer["result"], "timings_ms": timings, "batch": answer["batch"]})


class SAMCLIPAPI(_LitAPI):
    """The model worker: loads the checkpoint and warms it up in ``setup`` (the server is ready
    after), then answers each batch with :meth:`Engine.run`."""

    def __init__(self, checkpoint: str, spec: Endpoints, max_batch_size: int = 8, batch_timeout: float = 0.01,
                 compile: bool = False, api_key: Optional[str] = None, setup_error_path: Optional[str] = None,
                 workers: int = 1, shared_cache: Optional[str] = None) -> None:
        loop = WaitingBatchedLoop() if max_batch_size > 1 else "auto"  # batch 1: LitServe's loop blocks already
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, loop=loop)
        self.checkpoint, self.compile = checkpoint, compile
        self.api_key, self.setup_error_path = api_key, setup_error_path
        self.workers, self.shared_cache = workers, shared_cache
        self.log_level = logging.getLogger(logs.PACKAGE).getEffectiveLevel()  # the command's -v, for the worker

    def authorize(self, request: Request) -> None:
        """LitServe's auth hook, a dependency of every route: the API key in ``X-API-Key``."""
        if self.api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(401, f"missing or wrong API key: send this server's key in the {API_KEY_HEADER} "
                                     "header")

    def setup(self, device) -> None:
        child_of_server()  # SIGINT is the main process's to handle; exit with it
        logs.configure(self.log_level)  # a spawned process: the command's logging, set up again
        if str(device) == "cpu" and self.workers > 1:
            # Workers that share the cores each take their part: threads beyond it spin against each
            # other (measured on 2 shared cores: SAM's mask decoder at 1024 px, 2 threads 810 ms, 1 thread 279 ms).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
        try:
            predictor = SAMCLIPPredictor(self.checkpoint, device=device, compile=self.compile)
            cache = PassCache(self.spec.image_cache, predictor.device, self.shared_cache)
            self.engine = Engine(predictor, max_batch=self.max_batch_size, cache=cache)
            times = self.engine.warmup()
        except InputError as e:  # a checkpoint that cannot serve: the main process says why, in one line
            if self.setup_error_path:
                with open(self.setup_error_path, "w") as f:
                    f.write(" ".join(str(e).split()))
                logging.getLogger("litserve.loops.loops").disabled = True  # its traceback of the same error
            raise
        log.info("model loaded on %s and warmed up: %s", device,
                 ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))

    def decode_request(self, request, **kwargs):
        return request

    def batch(self, inputs):
        return list(inputs)

    def predict(self, x, **kwargs):
        # max_batch_size 1 gives LitServe's unbatched loop: one task, not a list.
        if isinstance(x, list):
            return self.engine.run(x)
        return self.engine.run([x])[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output, **kwargs):
        return output


def _json_errors(app) -> None:
    """Every error the framework itself raises (404, 405, 413, validation) as ``{"error": ...}``."""

    async def http_error(request, exc):
        return error_response(exc.status_code, str(exc.detail))

    async def validation_error(request, exc):
        return error_response(422, str(exc.errors()))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def _page(app) -> None:
    """The page at ``/`` and its files at ``/static/`` (instead of LitServe's "litserve running"),
    public: they hold no data, and the page asks for the API key when the API answers 401."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]

    async def page(request: Request) -> "FileResponse":
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=PAGE_HEADERS)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def worker_devices(device: str, devices: int) -> Tuple[str, int]:
    """LitServe's accelerator for ``device`` ("auto": CUDA when available) and the number of model
    devices; more devices than the machine has, or several on the CPU, is an InputError."""
    accelerator = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if accelerator == "cpu" and devices != 1:
        raise InputError(f"--devices {devices} counts GPUs, and this server runs on the CPU: leave --devices at 1 "
                         "and give --workers-per-device K for K model workers sharing the cores")
    if accelerator == "cuda" and devices > torch.cuda.device_count():
        raise InputError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return accelerator, devices


def build_server(checkpoint: str, max_batch_size: int = 8, batch_timeout: float = 0.01, device: str = "auto",
                 compile: bool = False, limits: Limits = Limits(), timeout: float = 60.0,
                 api_key: Optional[str] = None, setup_error_path: Optional[str] = None, devices: int = 1,
                 workers_per_device: int = 1, image_cache: int = 16,
                 shared_cache: Optional[str] = None) -> "ls.LitServer":
    """A LitServer for a merged checkpoint (not started: ``.run(host=, port=)``).

    max_batch_size / batch_timeout (seconds): how many requests may share a batch and how long
    the worker waits to fill one. device: "auto" (CUDA when available), "cpu" or "cuda".
    timeout: seconds a request may wait for its answer before a 504. api_key: required of every
    request (``X-API-Key``). setup_error_path: where the worker writes why it could not start.
    devices x workers_per_device: model workers (LitServe's options; GPUs 0..devices-1, each
    worker its own model copy and batches). image_cache: image passes each worker keeps;
    shared_cache: the folder where several workers share them (required with more than one).
    """
    require_litserve()
    config = read_merged_config(checkpoint)  # fails here, naming the file, before any process starts
    accelerator, devices = worker_devices(device, devices)
    workers = devices * workers_per_device
    if workers > 1 and shared_cache is None:
        raise ValueError("several model workers share their kept images through a folder: give shared_cache")
    bb = config.sam.backbone
    geometry = Geometry(img_size=int(bb.img_size), patch_size=int(bb.patch_size))
    info = {"checkpoint": checkpoint, "img_size": geometry.img_size, "patch_size": geometry.patch_size,
            "max_batch_size": max_batch_size, "batch_timeout_s": batch_timeout, "compile": compile,
            "limits": limits.__dict__, "endpoints": [f"{ROUTE_PREFIX}/{t}" for t in TASKS],
            "devices": devices, "workers_per_device": workers_per_device, "image_cache": image_cache}
    info["api_key"] = api_key is not None
    spec = Endpoints(limits, geometry, info, timeout, image_cache=image_cache)
    api = SAMCLIPAPI(checkpoint, spec, max_batch_size=max_batch_size, batch_timeout=batch_timeout, compile=compile,
                     api_key=api_key, setup_error_path=setup_error_path, workers=workers, shared_cache=shared_cache)
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device,
                          timeout=timeout, healthcheck_path=READY_PATH, model_metadata=info)
    server.uvicorn_graceful_timeout = SHUTDOWN_GRACE_S  # stopping takes seconds, not LitServe's 30
    _json_errors(server.app)
    _page(server.app)
    return server


@contextlib.contextmanager
def worker_environment() -> Iterator[Dict[str, str]]:
    """The environment the model workers are spawned with (LitServe spawns them, and OpenMP reads
    it when torch loads): :data:`WORKER_ENV` where the environment does not set its variables;
    the environment as it was afterwards. Yields the variables it set."""
    added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield added
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def shared_folder(workers: int) -> Iterator[Optional[str]]:
    """A folder for the workers' kept images (in memory, /dev/shm, where the machine has it),
    removed afterwards; None for one worker."""
    if workers <= 1:
        yield None
        return
    shm = "/dev/shm"
    path = tempfile.mkdtemp(prefix="fastsamclip-passes-",
                            dir=shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", **kwargs) -> None:
    """Build and run the server until SIGINT or SIGTERM (see :func:`build_server` for ``kwargs``);
    every process it started is gone when this returns. A worker that cannot start is an
    ``InputError`` with its reason."""
    fd, error_path = tempfile.mkstemp(prefix="fastsamclip-serve-", suffix=".txt")
    os.close(fd)
    _, devices = worker_devices(kwargs.get("device", "auto"), kwargs.get("devices", 1))
    try:
        with shared_folder(devices * kwargs.get("workers_per_device", 1)) as shared:
            server = build_server(checkpoint, setup_error_path=error_path, shared_cache=shared, **kwargs)
            with stopping_on_signals(), worker_environment():
                try:
                    server.run(host=host, port=port, num_api_servers=1, log_level=log_level,
                               generate_client_file=False)
                except KeyboardInterrupt:  # a stop before the server was up (LitServe handles it after)
                    pass
                except RuntimeError:
                    with open(error_path) as f:
                        why = f.read().strip()
                    if why:
                        raise InputError(f"the model worker could not start: {why}") from None
                    raise
                finally:
                    stop_children()
    finally:
        os.remove(error_path)
