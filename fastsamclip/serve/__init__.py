"""An HTTP API for the merged model with dynamic batching, on LitServe (see :mod:`fastsamclip.serve.app`).

- :mod:`~fastsamclip.serve.requests`: bodies -> validated tasks, or a 4xx with its message;
- :mod:`~fastsamclip.serve.engine`: a batch of tasks -> one backbone pass per geometry, then each
  task's head through the predictor;
- :mod:`~fastsamclip.serve.rle`: masks as COCO RLE;
- :mod:`~fastsamclip.serve.app`: the LitServe routes and worker; ``serve(checkpoint, host, port)``;
- :mod:`~fastsamclip.serve.processes`: the server's processes stop together (SIGTERM, SIGINT, kill -9);
- :mod:`~fastsamclip.serve.launch`: the server in a child process, ready or an error (benchmark, tests).
"""

from fastsamclip.serve.app import MISSING, build_server, serve
from fastsamclip.serve.engine import Engine
from fastsamclip.serve.launch import ServerProcess, free_port
from fastsamclip.serve.requests import Geometry, Limits, RequestError, make_task
from fastsamclip.serve.rle import encode_rle

__all__ = ["Engine", "Geometry", "Limits", "MISSING", "RequestError", "ServerProcess", "build_server", "encode_rle",
           "free_port", "make_task", "serve"]
