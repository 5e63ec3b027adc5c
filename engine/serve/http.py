"""The HTTP face of an `Engine`: an ASGI app (Starlette, served by uvicorn; the `serve` extra).

    POST /v1/images/generations   OpenAI-style: {"prompt", "n", "size", "response_format": "b64_json"}, plus
                                  the engine's own fields "seed", "steps", "guidance", "sampler", "eta",
                                  "negative_prompt". Answers
                                  {"created", "data": [{"b64_json": PNG base64}], "seed"}.
    GET  /health                  200 {"status": "ok", ...} while the worker runs and accepts requests, else 503
    GET  /metrics                 Prometheus text format: queue depth, requests, batch sizes, stage latencies

Every bad request is a 4xx with an OpenAI-style {"error": {"message", "type", "param"}} body: bad JSON,
unknown fields, wrong types or ranges (400), a body over 1 MiB (413), a full queue (429), a shut-down engine
(503), a timed-out request (504). A client that disconnects cancels its request (it leaves before the next
batch is formed). `answer` is the one reading of a request body, shared with the Ray Serve deployment
(unclip.serve.ray).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time

from .engine import MAX_SEED, Engine, EngineClosed, QueueFull

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
RESPONSE_FORMATS = ("b64_json",)
# Fields OpenAI clients send that change nothing here.
IGNORED_FIELDS = ("model", "user", "quality", "style")


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, a message, and the field it is about."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param}}


def _int(body: dict, name: str, low: int, high: int, default=None):
    v = body.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name} must be an integer in {low}..{high}; got {json.dumps(v)}", param=name)
    if not low <= v <= high:
        raise RequestError(f"{name} must be in {low}..{high}; got {v}", param=name)
    return v


def _number(name: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{name} must be a finite number; got {json.dumps(v)}", param=name)
    return float(v)


def _pair_or_object(body: dict, name: str, keys: tuple, check):
    """A field given as a list (one value per key) or an object {key: value} (some keys)."""
    v = body[name]
    if isinstance(v, list):
        if len(v) != len(keys):
            raise RequestError(f"{name} must be a list of {len(keys)} ({', '.join(keys)}) or an object with "
                               f"some of those keys; got {len(v)} values", param=name)
        return {k: check(f"{name}.{k}", x) for k, x in zip(keys, v)}
    if isinstance(v, dict):
        unknown = sorted(set(v) - set(keys))
        if unknown:
            raise RequestError(f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(keys)}", param=name)
        return {k: check(f"{name}.{k}", x) for k, x in v.items()}
    raise RequestError(f"{name} must be a list [{', '.join(keys)}] or an object; got {json.dumps(v)}", param=name)


def _steps_value(name: str, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name} must be an integer; got {json.dumps(v)}", param=name.split(".")[0])
    return v


def parse_generation(engine: Engine, body) -> dict:
    """A request body (parsed JSON) as `Engine.submit` keywords, or RequestError naming the field.
    The engine's own validation (unclip.request) then checks ranges against the model."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object; got {type(body).__name__}")
    allowed = {"prompt", "n", "size", "response_format", "seed", "steps", "guidance", "sampler", "eta",
               "negative_prompt", *IGNORED_FIELDS}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(json.dumps, unknown))}; allowed: "
                           f"{', '.join(sorted(allowed))}", param=unknown[0])
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string; got {json.dumps(prompt)}", param="prompt")
    kw: dict = {"num_images_per_prompt": _int(body, "n", 1, engine.max_images, 1), "output_type": "pil"}
    size = f"{engine.image_size}x{engine.image_size}"
    if body.get("size", size) != size:
        raise RequestError(f"size must be {json.dumps(size)} (this model's output size); got "
                           f"{json.dumps(body['size'])}", param="size")
    if body.get("response_format", "b64_json") not in RESPONSE_FORMATS:
        raise RequestError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got "
                           f"{json.dumps(body['response_format'])}", param="response_format")
    if body.get("seed") is not None:
        kw["seed"] = _int(body, "seed", 0, MAX_SEED)
    if "steps" in body:
        names = tuple(engine.cascade.stage_names)  # prior, decoder, then each upsampler
        steps = _pair_or_object(body, "steps", names, _steps_value)
        if "prior" in steps:
            kw["prior_num_inference_steps"] = steps["prior"]
        if "decoder" in steps:
            kw["decoder_num_inference_steps"] = steps["decoder"]
        if set(steps) & set(names[2:]):
            default = engine.options["super_res_num_inference_steps"]
            kw["super_res_num_inference_steps"] = [steps.get(up, default) for up in names[2:]]
    if "guidance" in body:
        for stage, v in _pair_or_object(body, "guidance", ("prior", "decoder"), _number).items():
            kw[f"{stage}_guidance_scale"] = v
    if "sampler" in body:
        if not isinstance(body["sampler"], str):
            raise RequestError(f"sampler must be a string; got {json.dumps(body['sampler'])}", param="sampler")
        kw["sampler"] = body["sampler"]
    if "eta" in body:
        kw["eta"] = _number("eta", body["eta"])
    if body.get("negative_prompt") is not None:
        if not isinstance(body["negative_prompt"], str):
            raise RequestError("negative_prompt must be a string", param="negative_prompt")
        kw["negative_prompt"] = body["negative_prompt"]
    return {"prompt": prompt, **kw}



def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def submit_parsed(engine: Engine, kw: dict):
    """`engine.submit(**kw)` with the engine's refusals as RequestErrors (4xx)."""
    try:
        return engine.submit(**kw)
    except (ValueError, TypeError) as e:
        raise RequestError(str(e)) from None
    except QueueFull as e:
        raise RequestError(str(e), status=429) from None
    except EngineClosed as e:
        raise RequestError(str(e), status=503) from None


def generation_response(output) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": png_b64(im)} for im in output.images],
            "seed": output.seed}


async def generate(engine: Engine, body) -> dict:
    """Validate a request body, run it, and answer the response body (RequestError for a 4xx)."""
    future = submit_parsed(engine, parse_generation(engine, body))
    try:
        output = await asyncio.wrap_future(future)
    except TimeoutError as e:
        raise RequestError(str(e), status=504) from None
    except EngineClosed as e:
        raise RequestError(str(e), status=503) from None
    return await asyncio.to_thread(generation_response, output)


async def answer(engine: Engine, raw: bytes) -> tuple[dict, int]:
    """(response body, HTTP status) for a raw request body: the one reading of a body, shared with the Ray
    Serve deployment (size, JSON, then `generate`)."""
    if len(raw) > MAX_BODY_BYTES:
        return error_body(f"the request body is over {MAX_BODY_BYTES} bytes"), 413
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return error_body(f"the request body is not valid JSON: {e}"), 400
    try:
        return await generate(engine, body), 200
    except RequestError as e:
        return error_body(str(e), e.param), e.status


async def until_disconnected(request, poll: float = DISCONNECT_POLL_S) -> None:
    """Return once the HTTP client of `request` (a Starlette request whose body has been read) has gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(poll)


async def answer_while_connected(engine: Engine, request, raw: bytes) -> tuple[dict, int] | None:
    """`answer`, cancelled (and with it the engine request, freeing its batch slot) if the client disconnects
    first; None then. A plain ASGI handler would otherwise run a gone client's request to the end."""
    work = asyncio.ensure_future(answer(engine, raw))
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    return work.result() if not work.cancelled() else None


def create_app(engine: Engine, *, close_engine: bool = False):
    """The ASGI app over `engine`. With close_engine, the app's shutdown closes the engine (finishing every
    accepted request)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .metrics import PrometheusRecorder

    metrics = PrometheusRecorder(engine)
    engine.add_recorder(metrics)

    async def images(request):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return JSONResponse(error_body(f"the request body is over {MAX_BODY_BYTES} bytes"), status_code=413)
        answered = await answer_while_connected(engine, request, await request.body())
        if answered is None:  # nobody to answer; the status is for the access log
            return Response(status_code=499)
        body, status = answered
        return JSONResponse(body, status_code=status)

    async def health(request):
        ok = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": engine.name,
                             "image_size": engine.image_size, "queue_depth": engine.queue_depth,
                             "in_progress": engine.in_progress, "max_batch": engine.max_batch},
                            status_code=200 if ok else 503)

    async def prometheus(request):
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request, exc):
        return JSONResponse(error_body(exc.detail), status_code=exc.status_code)

    async def server_error(request, exc):  # a bug of ours: say so, and keep serving
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", kind="server_error"),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = Starlette(routes=[Route("/v1/images/generations", images, methods=["POST"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", prometheus, methods=["GET"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted; on exit every accepted request is finished."""
    import uvicorn
    uvicorn.run(create_app(engine, close_engine=True), host=host, port=port, log_level=log_level)
