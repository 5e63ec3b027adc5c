"""unclip.serve.ray: a local Ray cluster on this machine, one replica of the toy model, 8 requests whose
images equal the in-process Engine's (same seeds)."""
import base64
import io
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
serve = pytest.importorskip("ray.serve")

from unclip.serve import Engine  # noqa: E402
from unclip.serve.ray import deployment  # noqa: E402

PROMPTS = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow star",
           "a big purple circle", "an orange square", "a circle and a square", "a green star on the right"]
STEPS = [5, 5, 3]  # small: the equality does not depend on the step count, the test time does


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pixels(answer: dict) -> np.ndarray:
    from PIL import Image
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in answer["data"]])


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    yield
    serve.shutdown()
    ray.shutdown()


def test_ray_replica_images_equal_the_in_process_engine(local_cluster):
    handle = serve.run(deployment(preset="toy", num_replicas=1, threads=1, max_batch=8), name="unclip-test",
                       route_prefix="/unclip-test")
    bodies = [{"prompt": p, "seed": i, "steps": STEPS} for i, p in enumerate(PROMPTS)]
    answers = [r.result(timeout_s=300) for r in [handle.generate.remote(b) for b in bodies]]
    assert all("error" not in a for a in answers), [a.get("error") for a in answers]
    assert [a["seed"] for a in answers] == list(range(8))

    from unclip.serve.http import generation_response, parse_generation
    with Engine.from_preset("toy", max_batch=8) as engine:
        local = [generation_response(f.result()) for f in
                 [engine.submit(**parse_generation(engine, b)) for b in bodies]]
    for a, b in zip(answers, local):
        ours, theirs = _pixels(a).astype(int), _pixels(b).astype(int)
        assert ours.shape == theirs.shape == (1, 64, 64, 3)
        # Both batched their requests (possibly at different batch sizes: rounding ≤ 1e-4 in [0, 1]), so
        # an 8-bit pixel may land one level apart, never more.
        assert np.abs(ours - theirs).max() <= 1

    bad = handle.generate.remote({"prompt": "x", "n": 0}).result(timeout_s=60)
    assert bad["status"] == 400 and "n must be in" in bad["error"]["message"]
    serve.delete("unclip-test")


def test_deployment_options_are_checked_before_ray_runs_anything():
    app = deployment(preset="toy", num_replicas=None, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert app is not None  # an Application, built without a cluster
    with pytest.raises(ValueError, match="not both"):
        deployment(num_replicas=2, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
