"""The fault campaign, kept: the server's cases, against the real server on a free loopback port.

One server (with an API key and a 1 s timeout) answers the request cases in order, then is
stopped with SIGTERM while its worker is busy; two more are stopped as Ctrl-C does (SIGINT to the
process group) and with ``kill -9``, and a third, whose model answers NaN, must refuse to start. Each case failed before its fix: the server answered anyone,
refused a prompt outside the image only after it joined a batch, read ``true`` as 1, answered a
busy worker's queue after 14 s instead of the timeout, logged a dropped upload as a traceback,
kept a core busy while idle, and outlived its stop with 4 processes holding the port."""

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastsamclip.checkpoint import load_merged, save_merged
from fastsamclip.cli import main
from fastsamclip.serve import ServerProcess

from .test_server import _b64, _png

httpx = pytest.importorskip("httpx", reason="the HTTP client of these tests (extra 'serve'); CI installs it")
pytest.importorskip("litserve", reason="the server needs litserve (extra 'serve'); CI installs it")
if not os.path.isdir("/proc/self"):
    pytest.skip("process accounting reads /proc (Linux)", allow_module_level=True)

KEY = "campaign-key-7f3a"
TIMEOUT_S = 1.0
START_DEADLINE_S = 180
STOP_DEADLINE_S = 15  # all processes gone after a stop (a few seconds on a quiet machine)
LABELS = ["cat", "dog"]


def session_pids(sid: int):
    """Live processes of session ``sid`` (ServerProcess starts the server in its own session)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session; a zombie is already gone
                pids.append(int(d))
    return pids


def cpu_ticks(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total


def port_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (as uvicorn binds: SO_REUSEADDR, so the
    closed connections' TIME_WAIT does not count; a process still listening does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_gone(proc: ServerProcess, deadline: float = STOP_DEADLINE_S) -> float:
    """Seconds until every process of the server's session is gone (fails past ``deadline``)."""
    t0 = time.monotonic()
    while session_pids(proc.proc.pid) and time.monotonic() - t0 < deadline:
        time.sleep(0.1)
    left = session_pids(proc.proc.pid)
    assert not left, f"{len(left)} processes of the server still alive {deadline} s after the stop: {left}"
    return time.monotonic() - t0


def new_server(micro, tmp_path_factory, name, args=(), **kw) -> ServerProcess:
    log = str(tmp_path_factory.mktemp(name) / "server.log")
    return ServerProcess(micro["merged"], ["--device", "cpu", *args], log_path=log, start_timeout=START_DEADLINE_S,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, **kw)


@pytest.fixture(scope="module")
def server(micro, tmp_path_factory):
    proc = new_server(micro, tmp_path_factory, "campaign-serve", ["--max-batch-size", "4", "--batch-timeout-ms", "20",
                                                                  "--timeout", str(TIMEOUT_S)], api_key=KEY)
    with proc:
        yield {"proc": proc, "url": proc.url, **micro}


def post(server, path, key=KEY, timeout=60.0, **kw):
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.post(f"{server['url']}{path}", headers=headers, timeout=timeout, **kw)


def log_of(server) -> str:
    return server["proc"].log()


# ------------------------------------------------------------------------------- security
def test_every_route_answers_401_without_the_key(server):
    body = {"image": _b64(_png(server["image"]))}
    for key in (None, "wrong"):
        r = post(server, "/v1/embed", key=key, json=body)
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"], r.text
        for path in ("/info", "/health", "/ready"):
            r = httpx.get(f"{server['url']}{path}", headers={"X-API-Key": key} if key else {}, timeout=30)
            assert r.status_code == 401, (path, r.text)
    assert post(server, "/v1/embed", json=body).status_code == 200
    assert httpx.get(f"{server['url']}/info", headers={"X-API-Key": KEY}, timeout=30).json()["model"]["api_key"]


@pytest.mark.parametrize("argv, match", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 lets every machine"),
    (["--host", "::"], "give an API key"),
    (["--timeout", "0"], "--timeout 0.0"),
    (["--port", "80"], "--port 80"),
    (["--max-image-mp", "-1"], "--max-image-mp -1.0"),
    (["--batch-timeout-ms", "nan"], "--batch-timeout-ms nan"),
])
def test_what_the_server_cannot_do_safely_is_refused_before_it_starts(micro, capsys, monkeypatch, argv, match):
    import fastsamclip.cli.serve as cli_serve

    monkeypatch.setattr(cli_serve, "serve", lambda *a, **k: pytest.fail("the server started"))
    for var in ("FASTSAMCLIP_API_KEY", "LIT_SERVER_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    rc = main(["serve", "--checkpoint", micro["merged"], *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("serve: ") and err.count("\n") == 1 and match in err, err


def test_a_key_opens_every_host_and_insecure_says_so(micro, monkeypatch):
    import fastsamclip.cli.serve as cli_serve

    started = []
    monkeypatch.setattr(cli_serve, "serve", lambda *a, **k: started.append(k["api_key"]))
    monkeypatch.setenv("FASTSAMCLIP_API_KEY", "from-the-environment")
    assert main(["serve", "--checkpoint", micro["merged"], "--host", "0.0.0.0"]) == 0
    monkeypatch.delenv("FASTSAMCLIP_API_KEY")
    assert main(["serve", "--checkpoint", micro["merged"], "--host", "0.0.0.0", "--insecure"]) == 0
    assert started == ["from-the-environment", None]


# ------------------------------------------------------------------------------- validated before batching
def test_bad_prompts_and_malformed_numbers_never_reach_a_batch(server):
    """Each is answered by the HTTP process (no ``batch`` in the answer) and costs no backbone pass
    (the worker's batch counter moves by one, for the good request after them)."""
    b64 = _b64(_png(server["image"]))  # 451 x 300
    before = post(server, "/v1/embed", json={"image": b64}).json()["batch"]["id"]
    bad = [
        ("/v1/segment", {"points": [[500, 10]]}, "outside the image"),
        ("/v1/segment", {"boxes": [[10, 10, 460, 90]]}, "outside the image"),
        ("/v1/segment", {"boxes": [[100, 10, 50, 90]]}, "x1 < x0"),
        ("/v1/segment", {"points": [[10, 10]], "point_labels": [7]}, "point labels must be"),
        ("/v1/segment", {"boxes": [True, True, 60, 60]}, "true/false"),
        ("/v1/segment", {"points": [[10, 10]], "point_labels": [True]}, "true/false"),
        ("/v1/everything", {"points_per_side": 2.5}, "must be an integer"),
        ("/v1/everything", {"pred_iou_thresh": "0.9"}, "finite number"),
        ("/v1/semantic", {"labels": LABELS, "threshold": True}, "finite number"),
        ("/v1/classify", {"labels": LABELS, "resolution": "224"}, "must be an integer"),
    ]
    for path, fields, match in bad:
        r = post(server, path, json={"image": b64, **fields})
        assert r.status_code == 422 and match in r.json()["error"], (fields, r.text)
        assert "batch" not in r.json(), (fields, "reached the worker")
    after = post(server, "/v1/embed", json={"image": b64}).json()["batch"]["id"]
    assert after == before + 1


def test_a_client_gone_mid_upload_is_one_log_line(server):
    with socket.create_connection(("127.0.0.1", server["proc"].port), timeout=10) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"X-API-Key: {KEY}\r\nContent-Length: 10000000\r\n\r\n".encode() + b'{"image": "' + b"A" * 65536)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "went away" not in log_of(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = log_of(server)
    assert "went away during its embed upload" in log and "Traceback" not in log and "ClientDisconnect" not in log, log


def test_an_idle_server_does_not_burn_a_core(server):
    time.sleep(1.0)
    pids = session_pids(server["proc"].proc.pid)
    ticks = cpu_ticks(pids)
    time.sleep(3.0)
    used = (cpu_ticks(pids) - ticks) / os.sysconf("SC_CLK_TCK") / 3.0
    assert used < 0.05, f"{used:.1%} of a core while idle ({len(pids)} processes)"


def test_a_busy_worker_does_not_hold_a_request_past_the_timeout(server):
    b64 = _b64(_png(server["image"]))
    slow = {"image": b64, "points_per_side": 64, "crop_n_layers": 2}  # seconds of work for the worker
    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(post, server, "/v1/everything", json=slow) for _ in range(2)]
        time.sleep(0.5)  # both in the worker's batch
        t0 = time.monotonic()
        r = post(server, "/v1/embed", json={"image": b64})
        waited = time.monotonic() - t0
        assert r.status_code == 504 and "timeout of 1 s" in r.json()["error"], r.text
        assert waited < TIMEOUT_S + 3.0, f"the 504 came after {waited:.1f} s"
        assert all(f.result().status_code == 504 for f in busy)


# ------------------------------------------------------------------------------- stopping
def test_sigterm_stops_every_process_in_seconds_even_with_the_worker_busy(server):
    proc = server["proc"]
    pool = ThreadPoolExecutor(1)
    pool.submit(post, server, "/v1/everything", json={"image": _b64(_png(server["image"])), "points_per_side": 64,
                                                       "crop_n_layers": 2}, timeout=30)
    time.sleep(0.5)
    assert len(session_pids(proc.proc.pid)) >= 3  # the main process, the HTTP server, the model worker, ...
    os.kill(proc.proc.pid, signal.SIGTERM)
    wait_gone(proc)
    pool.shutdown(wait=True)
    assert port_free(proc.port)
    log = log_of(server)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]


@pytest.fixture(scope="module")
def three(micro, tmp_path_factory):
    """Three more servers started side by side: two to stop (Ctrl-C, kill -9), and one whose
    checkpoint answers NaN (weights of 3e38, finite, that overflow), which must refuse to start."""
    model = load_merged(micro["merged"])
    with torch.no_grad():
        model.image_encoder.patch_embed.proj.weight.fill_(3e38)
    overflow = str(tmp_path_factory.mktemp("overflow") / "overflow.safetensors")
    save_merged(model, overflow)
    servers = {"ctrl_c": new_server(micro, tmp_path_factory, "ctrl-c"),
               "killed": new_server(micro, tmp_path_factory, "kill-9"),
               "overflow": new_server({**micro, "merged": overflow}, tmp_path_factory, "overflow")}
    errors = {}

    def start(name):
        try:
            servers[name].start()
        except RuntimeError as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield servers, errors
    for proc in servers.values():
        proc.stop()


def test_ctrl_c_and_kill_9_leave_no_process_and_a_free_port(three):
    servers, errors = three
    ctrl_c, killed = servers["ctrl_c"], servers["killed"]
    assert "ctrl_c" not in errors and "killed" not in errors, errors
    os.killpg(ctrl_c.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole group
    os.kill(killed.proc.pid, signal.SIGKILL)  # the main process only: its children must notice
    wait_gone(ctrl_c)
    wait_gone(killed)
    assert port_free(ctrl_c.port) and port_free(killed.port)
    log = ctrl_c.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]


def test_a_model_answering_nan_is_refused_at_start_in_one_line(three):
    servers, errors = three
    log = servers["overflow"].log()
    assert "overflow" in errors and servers["overflow"].proc.returncode == 2, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("serve: the model worker could not start: the model's image pass")
    assert "NaN or Infinity" in log and "Traceback" not in log, log[-3000:]
    assert not session_pids(servers["overflow"].proc.pid)
