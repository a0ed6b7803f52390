"""Run ``fastsamclip serve`` in a child process and wait until it is ready (the benchmark and the
tests drive the real server this way).

    with ServerProcess("merged.safetensors", ["--max-batch-size", "8"]) as server:
        httpx.post(f"{server.url}/v1/embed", json={...})

The child gets its own session, so that whatever is left of it after the stop can be found: the
server stops with all its processes on SIGINT (or SIGTERM) in seconds; SIGKILL to that session
alone is the last resort.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_ready(url: str, timeout: float = 1.0, headers: Optional[dict] = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/ready", headers=headers or {}),
                                    timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class ServerProcess:
    """``python -m fastsamclip serve --checkpoint CHECKPOINT ARGS`` on a free localhost port;
    ``api_key``: the server's key (given through the environment), sent by ``headers``."""

    def __init__(self, checkpoint: str, args: Sequence[str] = (), log_path: Optional[str] = None,
                 start_timeout: float = 300.0, env: Optional[dict] = None, api_key: Optional[str] = None) -> None:
        self.checkpoint, self.args = checkpoint, list(args)
        self.log_path, self.start_timeout = log_path or os.devnull, start_timeout
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("FASTSAMCLIP_API_KEY", None)
        self.headers = {}
        if api_key is not None:
            self.env["FASTSAMCLIP_API_KEY"] = api_key
            self.headers = {"X-API-Key": api_key}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def log(self) -> str:
        if self.log_path == os.devnull or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path) as f:
            return f.read()

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "fastsamclip", "serve", "--checkpoint", self.checkpoint, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}) before it was ready:\n{self.log()[-4000:]}")
            if is_ready(self.url, headers=self.headers):
                self.start_seconds = time.monotonic() - t0
                return self
            try:
                self.proc.wait(timeout=0.25)  # the pause between polls, cut short if the server exits
            except subprocess.TimeoutExpired:
                pass
        self.stop()
        raise RuntimeError(f"the server was not ready after {self.start_timeout:.0f} s:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the session started above is left, even with its main process gone (only that session)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
