"""Ray Serve: the same `Engine` as replicas, each owning a device, behind Ray's router and autoscaler (the
`ray` extra: `pip install "unclip-engine[ray]"`).

    import ray
    from ray import serve
    from unclip.serve.ray import deployment

    ray.init()                                   # or address="auto" to join a cluster
    handle = serve.run(deployment(preset="toy", num_replicas=2))
    handle.generate.remote({"prompt": "a red circle", "seed": 1}).result()   # {"created", "data", "seed"}
    # and over HTTP: POST http://127.0.0.1:8000/v1/images/generations (the same body as `unclip serve`)

Each replica builds its own Engine (its own worker thread batching stages across the requests routed to it),
so the batching, the validation (`unclip.serve.http.parse_generation`) and the answers are the ones of the
single-process server. This module is `unclip.serve.ray`; `ray` below is always the Ray package (absolute
imports).
"""
from __future__ import annotations

from .engine import Engine
from .http import RequestError, answer, error_body, generate as generate_body


class UnclipReplica:
    """One replica: an Engine over a model folder or a preset (the toy model by default) on `device`
    (default: "cuda" when the replica has a GPU, else "cpu")."""

    def __init__(self, model: str | None = None, preset: str | None = None, device: str | None = None,
                 dtype: str = "fp32", backend: str = "torch", threads: int | None = None,
                 engine_options: dict | None = None):
        import torch
        if threads is not None:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        options = dict(device=device, dtype=dtype, backend=backend, **(engine_options or {}))
        self.engine = Engine.from_pretrained(model, **options) if model else Engine.from_preset(preset, **options)

    async def generate(self, body: dict) -> dict:
        """A request body (as for `POST /v1/images/generations`) → its response body; a refused request
        answers {"error": {...}, "status": 4xx}."""
        try:
            return await generate_body(self.engine, body)
        except RequestError as e:
            return {**error_body(str(e), e.param), "status": e.status}

    async def __call__(self, request):
        """HTTP: POST /v1/images/generations and GET /health, below the application's route prefix."""
        from starlette.responses import JSONResponse
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/health"):
            ok = self.engine.healthy()
            return JSONResponse({"status": "ok" if ok else "unavailable", "queue_depth": self.engine.queue_depth},
                                status_code=200 if ok else 503)
        if request.method != "POST" or not path.endswith("/v1/images/generations"):
            return JSONResponse(error_body(f"no route {request.method} {request.url.path}"), status_code=404)
        # Ray Serve cancels this coroutine when the HTTP client disconnects, which cancels the engine request.
        body, status = await answer(self.engine, await request.body())
        return JSONResponse(body, status_code=status)

    def check_health(self) -> None:
        """Ray Serve's replica health check: a dead worker thread restarts the replica."""
        if not self.engine.healthy():
            raise RuntimeError("the engine's worker thread is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(cancel_pending=True, timeout=5)


def deployment(*, model: str | None = None, preset: str | None = None, device: str | None = None,
               dtype: str = "fp32", backend: str = "torch", num_replicas: int | None = 1,
               autoscaling_config: dict | None = None, num_cpus: float = 1, num_gpus: float = 0,
               threads: int | None = None, max_batch: int = 8, max_queue: int = 64, timeout: float | None = None,
               name: str = "unclip"):
    """A Ray Serve application of `UnclipReplica`s, ready for `serve.run`.

    num_replicas: a fixed count, or None with `autoscaling_config` (Ray's: e.g. {"min_replicas": 1,
    "max_replicas": 4, "target_ongoing_requests": max_batch}); num_gpus=1 gives each replica its own GPU.
    A replica takes up to max_batch + max_queue requests at once (Ray's max_ongoing_requests), so Ray's
    router feeds the engine's batches."""
    from ray import serve
    if autoscaling_config is not None and num_replicas not in (None, 1):
        raise ValueError("give num_replicas or autoscaling_config, not both")
    options = dict(name=name, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                   max_ongoing_requests=max_batch + max_queue)
    if autoscaling_config is not None:
        options["autoscaling_config"] = {"target_ongoing_requests": max_batch, **autoscaling_config}
    else:
        options["num_replicas"] = 1 if num_replicas is None else num_replicas
    replica = serve.deployment(UnclipReplica, **options)
    return replica.bind(model=model, preset=preset, device=device, dtype=dtype, backend=backend, threads=threads,
                        engine_options={"max_batch": max_batch, "max_queue": max_queue, "timeout": timeout})
