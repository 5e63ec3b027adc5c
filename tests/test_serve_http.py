"""unclip.serve.http: the ASGI app served by uvicorn on 127.0.0.1 (a real server in a thread): OpenAI-style
generations, 4xx for every malformed request (never a 500, never a dead worker), Prometheus metrics."""
import base64
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")

from unclip import Pipeline  # noqa: E402
from unclip.serve import Engine  # noqa: E402
from unclip.serve.http import RequestError, create_app, parse_generation, submit_parsed  # noqa: E402

STEPS = [3, 3, 2]


@pytest.fixture(scope="module")
def pipe(one_thread):
    return Pipeline.from_preset("toy")


@pytest.fixture(scope="module")
def server(pipe):
    import uvicorn
    engine = Engine(pipe, max_batch=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, close_engine=True), host="127.0.0.1", port=port,
                                        log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port, engine
    srv.should_exit = True
    thread.join(60)
    assert engine.closed  # the app's shutdown closed the engine


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        conn.close()


def test_generation_matches_the_pipeline(server, pipe):
    port, _ = server
    status, ctype, raw = request(port, "POST", "/v1/images/generations",
                                 {"prompt": "a red circle", "n": 2, "size": "64x64", "response_format": "b64_json",
                                  "seed": 11, "steps": STEPS, "guidance": [4, 2], "model": "toy"})
    assert status == 200 and ctype == "application/json", raw[:300]
    answer = json.loads(raw)
    assert answer["seed"] == 11 and len(answer["data"]) == 2 and isinstance(answer["created"], int)
    from PIL import Image
    got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in answer["data"]])
    ref = pipe("a red circle", num_images_per_prompt=2, generator=torch.Generator().manual_seed(11),
               prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2,
               prior_guidance_scale=4.0, decoder_guidance_scale=2.0, progress=False).images
    want = np.stack([np.asarray(im) for im in ref])
    assert got.shape == want.shape == (2, 64, 64, 3)
    assert np.array_equal(got, want)  # one request alone: the same numbers, the same PNG pixels


def test_negative_prompt_is_passed_through(server, pipe):
    port, _ = server
    status, _, raw = request(port, "POST", "/v1/images/generations",
                             {"prompt": "a red circle", "seed": 2, "steps": STEPS, "negative_prompt": "a blue square"})
    assert status == 200, raw[:300]
    from PIL import Image
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(raw)["data"][0]["b64_json"]))))
    kw = dict(generator=torch.Generator().manual_seed(2), prior_num_inference_steps=3, decoder_num_inference_steps=3,
              super_res_num_inference_steps=2, progress=False)
    want = np.asarray(pipe("a red circle", negative_prompt="a blue square", **kw).images[0])
    assert np.array_equal(got, want)
    status, _, raw = request(port, "POST", "/v1/images/generations", {"prompt": "x", "negative_prompt": 3})
    assert status == 400 and "negative_prompt must be a string" in json.loads(raw)["error"]["message"]


def test_steps_as_an_object_and_sampler(server):
    port, _ = server
    status, _, raw = request(port, "POST", "/v1/images/generations",
                             {"prompt": "a blue square", "steps": {"prior": 2, "decoder": 2, "super_res": 2},
                              "sampler": "ddim", "eta": 0.0})
    assert status == 200, raw[:300]
    assert len(json.loads(raw)["data"]) == 1


MALFORMED = [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ([1, 2, 3], 400, "must be a JSON object"),
    ("a string", 400, "must be a JSON object"),
    ({}, 400, "prompt must be a string"),
    ({"prompt": 5}, 400, "prompt must be a string"),
    ({"prompt": ["a", "b"]}, 400, "prompt must be a string"),
    ({"prompt": "x", "bogus": 1}, 400, "unknown field"),
    ({"prompt": "x", "n": 0}, 400, "n must be in 1..4"),
    ({"prompt": "x", "n": 5}, 400, "n must be in 1..4"),
    ({"prompt": "x", "n": 10**9}, 400, "n must be in 1..4"),
    ({"prompt": "x", "n": "2"}, 400, "n must be an integer"),
    ({"prompt": "x", "n": 2.5}, 400, "n must be an integer"),
    ({"prompt": "x", "n": True}, 400, "n must be an integer"),
    ({"prompt": "x", "size": "1024x1024"}, 400, 'size must be "64x64"'),
    ({"prompt": "x", "size": 64}, 400, 'size must be "64x64"'),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format must be one of b64_json"),
    ({"prompt": "x", "seed": -1}, 400, "seed must be in"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed must be in"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed must be an integer"),
    ({"prompt": "x", "steps": [1, 2]}, 400, "steps must be a list of 3"),
    ({"prompt": "x", "steps": [0, 2, 2]}, 400, "prior_num_inference_steps must be in 1..1000"),
    ({"prompt": "x", "steps": [2, 2, 5000]}, 400, "super_res_num_inference_steps must be in"),
    ({"prompt": "x", "steps": {"upsampler": 3}}, 400, "unknown key"),
    ({"prompt": "x", "steps": "many"}, 400, "steps must be a list"),
    ({"prompt": "x", "steps": [2.5, 2, 2]}, 400, "must be an integer"),
    ({"prompt": "x", "guidance": [1]}, 400, "guidance must be a list of 2"),
    ({"prompt": "x", "guidance": ["a", 2]}, 400, "must be a finite number"),
    ({"prompt": "x", "sampler": "euler"}, 400, "sampler must be one of ddpm, ddim"),
    ({"prompt": "x", "sampler": 3}, 400, "sampler must be a string"),
    ({"prompt": "x", "eta": -1}, 400, "eta must be >= 0"),
    ({"prompt": "x", "eta": "big"}, 400, "eta must be a finite number"),
    ({"prompt": "\ud800"}, 400, "not valid Unicode"),
    (b'{"prompt": "x", "n": NaN}', 400, "n must be an integer"),
    (b'{"prompt": "x", "eta": Infinity}', 400, "eta must be a finite number"),
    (b"x" * ((1 << 20) + 10), 413, "over 1048576 bytes"),
]


def test_200_malformed_requests_leave_the_server_healthy(server):
    port, engine = server
    before = engine.stats.snapshot()["submitted"]
    for i in range(200):
        body, want_status, want_message = MALFORMED[i % len(MALFORMED)]
        if isinstance(body, str):
            body = json.dumps(body)
        status, ctype, raw = request(port, "POST", "/v1/images/generations", body)
        assert status == want_status, (body[:80] if isinstance(body, bytes) else body, status, raw[:300])
        error = json.loads(raw)["error"]
        assert want_message in error["message"], (body, error)
    for method, path, want in (("GET", "/v1/images/generations", 405), ("POST", "/health", 405),
                               ("GET", "/nope", 404)):
        status, _, raw = request(port, method, path)
        assert status == want and "message" in json.loads(raw)["error"]
    assert engine.stats.snapshot()["submitted"] == before  # nothing bad reached the queue
    status, _, raw = request(port, "GET", "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, _, raw = request(port, "POST", "/v1/images/generations", {"prompt": "still here", "steps": STEPS})
    assert status == 200 and len(json.loads(raw)["data"]) == 1


def test_a_client_that_disconnects_cancels_its_request(server):
    """The client sends a long request and hangs up at once: the engine cancels it (it never completes as
    "ok"), and the server keeps answering the next one."""
    port, engine = server
    done = lambda: engine.stats.snapshot()["done"]  # noqa: E731
    before = dict(done())
    body = json.dumps({"prompt": "a red circle", "n": 4, "steps": [25, 25, 7], "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while engine.in_progress + engine.queue_depth == 0:  # accepted: now hang up
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
    deadline = time.monotonic() + 120
    while done().get("cancelled", 0) == before.get("cancelled", 0):
        assert time.monotonic() < deadline, done()
        time.sleep(0.05)
    assert done().get("ok", 0) == before.get("ok", 0), done()  # cancelled, not run to the end
    status, _, raw = request(port, "POST", "/v1/images/generations", {"prompt": "still here", "steps": STEPS})
    assert status == 200 and len(json.loads(raw)["data"]) == 1


def test_metrics_parse_as_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families
    port, _ = server
    assert request(port, "POST", "/v1/images/generations", {"prompt": "a star", "steps": STEPS})[0] == 200
    status, ctype, raw = request(port, "GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    for name in ("unclip_queue_depth", "unclip_in_progress", "unclip_requests", "unclip_batch_size",
                 "unclip_stage_seconds", "unclip_request_seconds"):
        assert name in families, sorted(families)
    stage_counts = {s.labels["stage"]: s.value for s in families["unclip_stage_seconds"].samples
                    if s.name == "unclip_stage_seconds_count"}
    assert set(stage_counts) == {"prior", "decoder", "super_res"} and min(stage_counts.values()) >= 1
    ok = [s.value for s in families["unclip_requests"].samples
          if s.name == "unclip_requests_total" and s.labels["status"] == "ok"]
    assert ok and ok[0] >= 1


def test_refusals_map_to_4xx(pipe):
    with Engine(pipe, max_queue=0) as engine:
        with pytest.raises(RequestError, match="queue is full") as e:
            submit_parsed(engine, parse_generation(engine, {"prompt": "x"}))
        assert e.value.status == 429
    with pytest.raises(RequestError, match="shut down") as e:
        submit_parsed(engine, parse_generation(engine, {"prompt": "x"}))
    assert e.value.status == 503
