"""`fastsamclip serve`: the real server in a subprocess on a free localhost port, driven by a real
HTTP client. Every endpoint's answer equals the predictor's on the same input; concurrent requests
share a backbone pass; bad requests are 4xx JSON; a bounded storm of good and bad requests."""

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fastsamclip.cli import main
from fastsamclip.data.sa1b import rle_run_lengths
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.serve import Engine, Geometry, Limits, ServerProcess, make_task

httpx = pytest.importorskip("httpx", reason="the HTTP client of these tests (extra 'serve'); CI installs it")
pytest.importorskip("litserve", reason="the server needs litserve (extra 'serve'); CI installs it")

LABELS = ["cat", "dog", "grass"]
BATCH_WINDOW_MS = 150  # long enough on a loaded 2-core machine for concurrent requests to meet
START_DEADLINE_S = 180  # seconds; loading: spawn a worker (imports torch), load and warm the model
MAX_IMAGE_MP = 1.0  # so that a "huge" test image stays small on disk
MAX_REQUEST_MB = 2


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE -> (h, w) bool, with numpy only (the package's validated run-length parser)."""
    h, w = rle["size"]
    runs = rle_run_lengths(rle["counts"])
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(w, h).T


@pytest.fixture(scope="module")
def server(micro, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("serve") / "server.log")
    proc = ServerProcess(micro["merged"], ["--max-batch-size", "4", "--batch-timeout-ms", str(BATCH_WINDOW_MS),
                                           "--max-image-mp", str(MAX_IMAGE_MP), "--max-request-mb",
                                           str(MAX_REQUEST_MB), "--device", "cpu"],
                         log_path=log_path, start_timeout=START_DEADLINE_S,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    with proc:
        predictor = SAMCLIPPredictor(micro["merged"], device="cpu")
        yield {"url": proc.url, "proc": proc, "log": log_path, "predictor": predictor, **micro}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["url"], timeout=60.0) as c:
        yield c


def _image(server, k=0):
    """Three different non-square pictures."""
    img = server["image"]
    return [img, np.ascontiguousarray(img[::-1, ::2]), np.ascontiguousarray(img[:200, :120])][k]


def _expect_embed(p, image):
    return p.embed_images(image)["clip"][0].numpy()


def test_health_readiness_and_info(client, server):
    assert client.get("/health").json() == {"status": "alive", "ready": True}
    assert client.get("/ready").status_code == 200
    info = client.get("/info").json()["model"]
    assert info["img_size"] == 64 and info["max_batch_size"] == 4 and "/v1/segment" in info["endpoints"]


def test_embed_equals_the_predictor(client, server):
    p, image = server["predictor"], _image(server)
    r = client.post("/v1/embed", json={"image": _b64(_png(image)), "sam": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = p.embed_images(image)
    np.testing.assert_allclose(body["clip_embedding"], ref["clip"][0].numpy(), atol=1e-5)
    sam = body["sam_embedding"]
    got = np.frombuffer(base64.b64decode(sam["data"]), "<f4").reshape(sam["shape"])
    np.testing.assert_allclose(got, ref["sam"][0].numpy(), atol=1e-5)
    assert set(body["timings_ms"]) >= {"decode", "queue", "backbone", "head", "total"}
    assert body["batch"]["pass"] == "sam 64px"


def test_classify_multipart_equals_the_predictor(client, server):
    p, image = server["predictor"], _image(server, 1)
    r = client.post("/v1/classify", files={"image": ("x.png", _png(image), "image/png")},
                    data={"labels": json.dumps(LABELS)})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = p.classify([image], LABELS)[0]
    np.testing.assert_allclose(body["probs"], ref, atol=1e-5)
    assert body["labels"] == LABELS and body["label"] == LABELS[int(np.argmax(ref))]
    assert body["batch"]["pass"] == "clip 224px"


def _assert_masks_equal(got_rles, masks, logits):
    """Bool masks equal except where the logit is within float noise of SAM's threshold 0."""
    for rle, mask, logit in zip(got_rles, masks, logits):
        got = decode_rle(rle)
        assert got.shape == mask.shape
        differ = got != mask
        assert not (differ & (np.abs(logit) > 1e-3)).any(), f"{int(differ.sum())} mask pixels differ"


@pytest.mark.parametrize("prompt", [
    dict(points=[[[40.0, 30.0], [300.0, 200.0]]], point_labels=[[1, 0]], multimask_output=True),
    dict(boxes=[[20.0, 10.0, 400.0, 290.0], [100.0, 50.0, 200.0, 150.0]], multimask_output=False),
], ids=["points", "boxes"])
def test_segment_equals_the_predictor(client, server, prompt):
    p, image = server["predictor"], _image(server)
    r = client.post("/v1/segment", json={"image": _b64(_png(image)), **prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    p.set_image(image)
    args = dict(points=prompt.get("points"), point_labels=prompt.get("point_labels"), boxes=prompt.get("boxes"),
                multimask_output=prompt["multimask_output"])
    masks, scores, _ = p.segment(**args)
    logits, _, _ = p.segment(**args, return_logits=True)
    np.testing.assert_allclose(body["scores"], scores, atol=1e-5)
    assert body["size"] == list(image.shape[:2])
    for k in range(len(masks)):
        _assert_masks_equal(body["masks"][k], masks[k], logits[k])


def test_a_hover_runs_no_backbone_pass_and_no_text_tower(micro):
    """What the page sends per pointer move (the kept image's id, one point, its labels) costs the
    mask decoder and the pooling: no module of the backbone, the CLIP head or the text tower runs."""
    p = SAMCLIPPredictor(micro["merged"], device="cpu")
    engine, geometry, image = Engine(p, max_batch=1), Geometry(p.img_size, p.patch_size), micro["image"]
    kept = engine.run([make_task("image", {"image": _png(image), "labels": LABELS, "templates": "simple"}, Limits(),
                                 geometry)])[0]["result"]
    calls = []
    for part in (p.model.image_encoder, p.model.clip_head, p.model.text):
        for module in part.modules():
            module.register_forward_pre_hook(lambda m, args: calls.append(type(m).__name__))
    hover = {"image_id": kept["image_id"], "points": [[[40.0, 30.0]]], "multimask_output": False, "labels": LABELS,
             "templates": "simple"}
    for _ in range(2):
        answer = engine.run([make_task("segment", json.loads(json.dumps(hover)), Limits(), geometry,
                                       {kept["image_id"]: tuple(kept["size"])})])[0]
        assert answer["result"]["label"][0][0] in LABELS and answer["batch"]["pass"] == "kept"
    assert not calls, f"a hover ran {sorted(set(calls))}"


def test_the_model_worker_waits_for_work_asleep(client, server):
    """Its OpenMP threads sleep between ops rather than spin (on shared cores spinning made a hover
    3-4x slower), unless the environment says otherwise."""
    worker = client.post("/v1/embed", json={"image": _b64(_png(_image(server)))}).json()["batch"]["worker"]
    try:
        with open(f"/proc/{worker['pid']}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except FileNotFoundError:
        pytest.skip("reads the worker's environment in /proc (Linux)")
    assert env.get(b"OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY", "PASSIVE").encode()


@pytest.mark.parametrize("mode", ["clip", "composed"])
def test_semantic_equals_the_predictor(client, server, mode):
    p, image = server["predictor"], _image(server, 2)
    r = client.post("/v1/semantic", json={"image": _b64(_png(image)), "labels": LABELS, "mode": mode,
                                          "threshold": 0.3})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = p.semantic_segment(image, LABELS, mode=mode, threshold=0.3)
    np.testing.assert_allclose(body["class_scores"], ref.class_scores, atol=1e-5)
    present = [LABELS[c] for c in np.unique(ref.label_map) if c >= 0]
    assert body["present"] == present
    for c, name in enumerate(LABELS):
        if name in present:
            # argmax over classes: equal but for float-noise ties (none expected on one image)
            assert (decode_rle(body["masks"][name]) != (ref.label_map == c)).mean() < 1e-3
    if mode == "composed":
        assert body["prompted"] == [LABELS[c] for c in ref.prompted]


def test_everything_equals_the_predictors_generate(client, server):
    p, image = server["predictor"], _image(server)
    params = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    r = client.post("/v1/everything", files={"image": ("x.png", _png(image), "image/png")},
                    data={"labels": json.dumps(LABELS), **{k: json.dumps(v) for k, v in params.items()}})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = p.generate(image, labels=LABELS, output_mode="coco_rle", **params)
    assert body["count"] == len(ref) > 0 and body["size"] == list(image.shape[:2])
    for got, want in zip(body["masks"], ref):
        assert (decode_rle(got["segmentation"]) != decode_rle(want["segmentation"])).mean() < 1e-3
        assert got["bbox"] == list(want["bbox"]) and got["label"] == want["label"]
        assert got["predicted_iou"] == pytest.approx(want["predicted_iou"], abs=1e-5)
        assert got["label_probs"] == pytest.approx(want["label_probs"], abs=1e-5)


def test_concepts_equals_the_predictors_segment_text(client, server):
    p, image = server["predictor"], _image(server, 1)
    params = dict(threshold=0.0, score_threshold=0.0, max_peaks=4)
    r = client.post("/v1/concepts", json={"image": _b64(_png(image)), "phrases": ["a cat", "grass"], **params})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = p.segment_text(image, ["a cat", "grass"], output_mode="coco_rle", **params)
    assert body["count"] == len(ref) > 0 and body["size"] == list(image.shape[:2])
    for got, want in zip(body["instances"], ref):
        assert got["phrase"] == want["phrase"] and got["bbox"] == want["bbox"]
        assert (decode_rle(got["segmentation"]) != decode_rle(want["segmentation"])).mean() < 1e-3
    r = client.post("/v1/concepts", json={"image": _b64(_png(image)), "phrases": ["a cat", ""]})
    assert r.status_code == 422 and "is empty" in r.json()["error"]


def test_concurrent_requests_share_one_backbone_pass(server):
    """Four requests at once, inside one batching window: answered from a shared pass (the batch
    size is in every answer), each still equal to the predictor's own answer."""
    p = server["predictor"]
    images = [_image(server, k % 3) for k in range(4)]
    payloads = [{"image": _b64(_png(im))} for im in images]

    def post(body):
        return httpx.post(f"{server['url']}/v1/embed", json=body, timeout=60.0)

    shared = None
    for _ in range(3):  # a heavily loaded machine may split a window; three tries, each bounded
        with ThreadPoolExecutor(4) as pool:
            answers = [r.json() for r in pool.map(post, payloads)]
        for body, im in zip(answers, images):
            np.testing.assert_allclose(body["clip_embedding"], _expect_embed(p, im), atol=1e-4)
        shared = max(a["batch"]["backbone_batch"] for a in answers)
        if shared > 1:
            break
    assert shared > 1, [a["batch"] for a in answers]
    together = [a for a in answers if a["batch"]["backbone_batch"] > 1]
    assert len({a["batch"]["id"] for a in together}) < len(together)  # the same batch, seen by each


def _huge_png() -> bytes:
    side = int((MAX_IMAGE_MP * 1e6) ** 0.5) + 50
    return _png(np.zeros((side, side, 3), np.uint8))


def _bad_requests(server):
    """(name, request kwargs for httpx, path) of every malformed kind."""
    png = _png(_image(server))
    b64 = _b64(png)
    nan_body = ('{"image": "%s", "points": [[10, NaN]]}' % b64).encode()
    return [
        ("not an image", dict(json={"image": _b64(b"hello, this is not a picture")}), "/v1/embed"),
        ("truncated image", dict(json={"image": _b64(png[: len(png) // 2])}), "/v1/embed"),
        ("huge image", dict(files={"image": ("h.png", _huge_png(), "image/png")}), "/v1/embed"),
        ("box outside the image", dict(json={"image": b64, "boxes": [[10, 10, 5000, 90]]}), "/v1/segment"),
        ("point outside the image", dict(json={"image": b64, "points": [[-3, 10]]}), "/v1/segment"),
        ("flipped box", dict(json={"image": b64, "boxes": [[100, 10, 50, 90]]}), "/v1/segment"),
        ("NaN", dict(content=nan_body, headers={"content-type": "application/json"}), "/v1/segment"),
        ("missing image", dict(json={"labels": LABELS}), "/v1/classify"),
        ("missing labels", dict(json={"image": b64}), "/v1/classify"),
        ("missing prompts", dict(json={"image": b64}), "/v1/segment"),
        ("empty label list", dict(json={"image": b64, "labels": []}), "/v1/semantic"),
        ("labels as one string", dict(json={"image": b64, "labels": "cat,dog"}), "/v1/classify"),
        ("wrong content type", dict(content=png, headers={"content-type": "image/png"}), "/v1/embed"),
        ("no content type", dict(content=b"{}"), "/v1/embed"),
        ("invalid JSON", dict(content=b"{not json", headers={"content-type": "application/json"}), "/v1/embed"),
        ("not base64", dict(json={"image": "@@@@"}), "/v1/embed"),
        ("unknown field", dict(json={"image": b64, "colour": "red"}), "/v1/embed"),
        ("bad resolution", dict(json={"image": b64, "labels": LABELS, "resolution": 100}), "/v1/classify"),
        ("bad mode", dict(json={"image": b64, "labels": LABELS, "mode": "fast"}), "/v1/semantic"),
        ("bad point label", dict(json={"image": b64, "points": [[10, 10]], "point_labels": [7]}), "/v1/segment"),
        ("too many points", dict(json={"image": b64, "points_per_side": 1000}), "/v1/everything"),
        ("bad generator value", dict(json={"image": b64, "box_nms_thresh": "high"}), "/v1/everything"),
        ("body too large", dict(content=b"x" * (MAX_REQUEST_MB * 2**20 + 10),
                                headers={"content-type": "application/json"}), "/v1/embed"),
        ("broken multipart", dict(content=b"--zz\r\nnope", headers={"content-type": "multipart/form-data; boundary=zz"}),
         "/v1/embed"),
    ]


def test_bad_requests_get_a_4xx_with_the_message_and_the_server_goes_on(client, server):
    seen = {}
    for name, kwargs, path in _bad_requests(server):
        r = client.post(path, **kwargs)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert isinstance(r.json().get("error"), str) and r.json()["error"], (name, r.text[:300])
        seen[name] = r.status_code
    assert seen["huge image"] == 413 and seen["body too large"] == 413 and seen["wrong content type"] == 415
    assert seen["missing labels"] == 422 and seen["truncated image"] == 400
    # The framework's own errors are JSON too.
    r = client.get("/v1/embed")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/v2/nothing", json={})
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/health").json()["ready"] is True
    r = client.post("/v1/embed", json={"image": _b64(_png(_image(server)))})
    assert r.status_code == 200


def test_a_bounded_storm_of_good_and_bad_requests(server):
    """60 requests, 8 at a time, one minute at most: every good one right, every bad one a 4xx."""
    p = server["predictor"]
    good = []
    for k in range(3):
        im = _image(server, k)
        good.append(("/v1/embed", dict(json={"image": _b64(_png(im))}),
                     lambda b, im=im: np.testing.assert_allclose(b["clip_embedding"], _expect_embed(p, im), atol=1e-4)))
        ref = p.classify([im], LABELS)[0]
        good.append(("/v1/classify", dict(json={"image": _b64(_png(im)), "labels": LABELS}),
                     lambda b, ref=ref: np.testing.assert_allclose(b["probs"], ref, atol=1e-4)))
        p.set_image(im)
        _, scores, _ = p.segment(boxes=[10, 10, 100, 90], multimask_output=False)
        good.append(("/v1/segment", dict(json={"image": _b64(_png(im)), "boxes": [[10, 10, 100, 90]],
                                               "multimask_output": False}),
                     lambda b, s=scores: np.testing.assert_allclose(b["scores"], s, atol=1e-4)))
    bad = [(path, kw, None) for _, kw, path in _bad_requests(server) if "too large" not in _]
    plan = [(good + bad)[i % (len(good) + len(bad))] for i in range(60)]
    deadline = time.monotonic() + 60

    def send(item):
        path, kwargs, check = item
        remaining = max(1.0, deadline - time.monotonic())
        return item, httpx.post(f"{server['url']}{path}", timeout=remaining, **kwargs)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, plan))
    assert time.monotonic() < deadline
    for (path, kwargs, check), r in results:
        if check is None:
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
            assert "error" in r.json()
        else:
            assert r.status_code == 200, (path, r.text[:300])
            check(r.json())
    assert server["proc"].alive()
    assert httpx.get(f"{server['url']}/health", timeout=10).json() == {"status": "alive", "ready": True}
    log = open(server["log"]).read()
    assert "Traceback" not in log, log[-3000:]


def test_serve_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nope.safetensors"), "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("serve:") and len(err.splitlines()) == 1
