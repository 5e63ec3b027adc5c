"""`Engine`: the in-process server. Requests are queued, and one worker thread that owns the cascade runs
their stages batched across requests.

Each request is the text-to-image call as a coroutine (`unclip.text_to_image.generate_stages`): it builds
its next `Stage` (drawing that stage's random numbers from the request's own generator) and is sent the
stage's final latents back. The scheduler groups the waiting requests whose next stages share a
`stages.batch_key` (same stage, plan, guidance, dtype, shapes except rows), concatenates them
(`stages.concat_stages`), runs the batch once through the runner (`Cascade.run`) and hands each request
its own rows (`stages.split_rows`). Rows never mix inside a network, so a request's images do not depend on
what it was batched with, except for kernel rounding at a different batch size (toy model, fp32 CPU, image
values in [0, 1]: max |Δ| ≤ 2e-5 at 25/25/7, at most 1.3e-4 seen at other step counts; tests bound 2e-4). Text encoding, text_proj and the work between stages
run per request, exactly as `Pipeline.__call__` does them.

Scheduling: the earliest cascade stage goes first (new requests catch up and join the later stages'
batches), ties go to the request that has waited longest; at most `max_batch` images run in one batch and
at most `max_batch` requests are in progress, so no request starves. A first-stage batch that is not full
waits up to `batch_window` seconds (from its oldest request) for more arrivals; a request alone pays that
once.

Admission: `max_queue` requests may wait (beyond that `QueueFull`), each with an optional timeout
(`TimeoutError`); `Future.cancel()` works until the request completes, and a cancelled or timed-out request
leaves before the next batch is formed. `close()` finishes (or with `cancel_pending=True` fails) every
accepted request: none is dropped silently.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .. import stages
from ..cascade import UnCLIPOutput
from ..observers import Observer, check_observer
from ..request import check_int, generate_request, resolve_dtype
from ..text_to_image import generate_stages
from .metrics import Stats

MAX_SEED = 2**63 - 1

# The call keywords a request may set (Pipeline.__call__'s names and defaults; guidance None = the model's).
OPTIONS = {
    "num_images_per_prompt": 1,
    "prior_num_inference_steps": 25,
    "decoder_num_inference_steps": 25,
    "super_res_num_inference_steps": 7,
    "prior_guidance_scale": None,
    "decoder_guidance_scale": None,
    "sampler": "ddpm",
    "eta": 0.0,
    "prior_candidates": 1,
    "output_type": "pil",
    "negative_prompt": None,
}


class EngineClosed(RuntimeError):
    """The engine is shut down (or shutting down): it accepts no request, and fails those it could not run."""


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` waiting requests already: try again later."""


@dataclass
class ServeOutput(UnCLIPOutput):
    """`UnCLIPOutput` plus the seed the request used and the batch sizes (images) its stages ran at."""
    seed: int = 0
    batch_sizes: dict = field(default_factory=dict)


def supported_options() -> dict:
    """{keyword: default} a request may set."""
    return dict(OPTIONS)


class _Job:
    """One accepted request: its coroutine, the stage it waits to run, its future and bookkeeping."""

    def __init__(self, request, seed: int, observer: Observer | None, deadline: float | None, timeout):
        self.request = request
        self.seed = seed
        self.observer = observer
        self.deadline = deadline
        self.timeout = timeout
        self.future: Future = Future()
        self.steps = None          # the coroutine (generate_stages), started at admission
        self.stage = None          # the next stage to run
        self.position = 0          # how many stages it has run (its place in the cascade)
        self.ready_at = 0.0        # when `stage` became ready
        self.submitted = time.monotonic()
        self.error: BaseException | None = None  # from the request's own observer
        self.batch_sizes: dict = {}

    def notify(self, hook: str, *args) -> None:
        """Call the request's observer; an exception there fails this request only."""
        if self.observer is None or self.error is not None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the request's future
            self.error = e


class _JobObserver(Observer):
    """What a request's coroutine reports by itself (the "text" phase)."""

    def __init__(self, job: _Job):
        self.job = job

    def on_stage_start(self, name, stage):
        self.job.notify("on_stage_start", name, stage)

    def on_stage_end(self, name, stage, latents):
        self.job.notify("on_stage_end", name, stage, latents)


class _BatchObserver(Observer):
    """The events of a batched stage, told to each request with its own stage and its own latents rows."""

    def __init__(self, jobs: list):
        self.jobs = jobs
        self.wants_steps = any(j.observer is not None and j.observer.wants_steps for j in jobs)
        self.rows = [j.stage.rows for j in jobs]

    def _each(self, latents):
        if latents is None:
            return [None] * len(self.jobs)
        return stages.split_rows(latents, self.rows)

    def on_stage_start(self, name, stage):
        for j in self.jobs:
            j.notify("on_stage_start", name, j.stage)

    def on_step(self, stage, i, t, latents):
        for j, x in zip(self.jobs, self._each(latents)):
            j.notify("on_step", j.stage, i, t, x)

    def on_stage_end(self, name, stage, latents):
        for j, x in zip(self.jobs, self._each(latents)):
            j.notify("on_stage_end", name, j.stage, x)


class Engine:
    """An in-process image server over one cascade (a `Pipeline` or its `Cascade`).

    max_batch: most images one stage batch runs (and most requests in progress at once).
    max_queue: most requests waiting to start; `submit` raises `QueueFull` beyond it.
    timeout: default per-request time limit in seconds (queue wait included), None for none.
    batch_window: seconds a first-stage batch that is not full waits for more requests to arrive.
    max_images: most images one request may ask for (default: max_batch).
    """

    def __init__(self, pipeline, *, max_batch: int = 8, max_queue: int = 64, timeout: float | None = None,
                 batch_window: float = 0.02, max_images: int | None = None, name: str = "unclip"):
        self.cascade = getattr(pipeline, "cascade", pipeline)
        if self.cascade.components.prior is None:
            raise ValueError("Engine serves text to image, and this cascade has no prior (an image-variation model)")
        self.max_batch = check_int("max_batch", max_batch, 1, 4096)
        self.max_queue = check_int("max_queue", max_queue, 0, 10**6)
        self.max_images = self.max_batch if max_images is None else check_int("max_images", max_images, 1,
                                                                              self.max_batch)
        self.timeout = self._check_timeout(timeout)
        if isinstance(batch_window, bool) or not isinstance(batch_window, (int, float)) or not \
                0 <= batch_window <= 10:
            raise ValueError(f"batch_window must be a number of seconds in [0, 10]; got {batch_window!r}")
        self.batch_window = float(batch_window)
        self.name = name
        self.options = supported_options()
        self.stats = Stats()
        self._recorders = [self.stats]
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._active: list = []
        self._closing = False
        self._abort = False
        self._worker = threading.Thread(target=self._work, name="unclip-serve-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ construction
    # Built on the core (Cascade), not on unclip.pipeline: only the package face and the CLI import that.
    @classmethod
    def from_preset(cls, name: str | None = None, *, seed: int = 0, device="cpu", dtype="fp32", backend="torch",
                    **engine_options) -> "Engine":
        """An engine over a preset (default: the CLI's, the trained toy cascade)."""
        from ..cascade import Cascade
        from ..presets import build_preset, default_preset
        name = name or default_preset()
        dtype = resolve_dtype(dtype)
        components = build_preset(name, seed=seed, device=device, dtype=dtype)
        components.source = f"preset {name}"
        return cls(Cascade.build(components, backend=backend, device=device, dtype=dtype), name=name,
                   **engine_options)

    @classmethod
    def from_pretrained(cls, path: str, *, device="cpu", dtype="fp32", backend="torch", **engine_options) -> "Engine":
        """An engine over a diffusers-layout unCLIP folder (or a graph backend's export folder)."""
        import os

        from ..cascade import Cascade
        from ..runner import require_available, runner_class
        dtype = resolve_dtype(dtype)
        klass = runner_class(backend)
        require_available(klass, device)
        components = klass.load(str(path), device=device, dtype=dtype)
        if components.source is None:
            components.source = str(path)
        return cls(Cascade.build(components, backend=klass, device=device, dtype=dtype),
                   name=os.path.basename(os.path.normpath(path)), **engine_options)

    @property
    def image_size(self) -> int:
        return self.cascade.image_size

    def add_recorder(self, recorder) -> None:
        """Another metrics recorder (same methods as `unclip.serve.metrics.Stats`), e.g. Prometheus'."""
        self._recorders.append(recorder)

    # ------------------------------------------------------------------ submitting
    @staticmethod
    def _check_timeout(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"timeout must be a positive number of seconds (or None); got {value!r}")
        return float(value)

    def make_request(self, prompt, *, seed: int | None = None, **options):
        """(validated `GenerateRequest`, seed): what `submit` queues. Raises ValueError/TypeError naming the
        bad argument, before anything is queued."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"unknown request option(s) {', '.join(unknown)}; allowed: seed, timeout, observer, "
                            f"{', '.join(self.options)}")
        kw = {**self.options, **options}
        check_int("num_images_per_prompt", kw["num_images_per_prompt"], 1, self.max_images)
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else check_int("seed", seed, 0, MAX_SEED)
        request = generate_request(
            self.cascade, prompt=prompt, generator=torch.Generator().manual_seed(seed), prior_latents=None,
            decoder_latents=None, super_res_latents=None, text_model_output=None, text_attention_mask=None,
            return_dict=True, callback=None, progress=False, call_default=self.cascade.call_default, **kw)
        return request, seed

    def submit(self, prompt, *, seed: int | None = None, timeout: float | None = None,
               observer: Observer | None = None, **options) -> Future:
        """Queue a text-to-image request; a `concurrent.futures.Future` of its `ServeOutput`.

        options: `Pipeline.__call__` keywords (see `supported_options()`); seed: the request's own
        generator seed (None: a random one, reported in the output); timeout: seconds (default the engine's);
        observer: a `unclip.Observer` told about this request's stages and steps (from the worker thread).
        Raises ValueError/TypeError for a bad request, QueueFull, or EngineClosed; nothing is queued then."""
        check_observer(observer)
        timeout = self.timeout if timeout is None else self._check_timeout(timeout)
        request, seed = self.make_request(prompt, seed=seed, **options)
        deadline = None if timeout is None else time.monotonic() + timeout
        job = _Job(request, seed, observer, deadline, timeout)
        with self._cv:
            if self._closing:
                self._record("on_reject", "closed")
                raise EngineClosed("the engine is shut down; it accepts no more requests")
            self._purge(self._queue, time.monotonic())
            if len(self._queue) >= self.max_queue:
                self._record("on_reject", "queue_full")
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self._queue.append(job)
            self._record("on_submit")
            self._cv.notify_all()
        return job.future

    async def submit_async(self, prompt, **kwargs) -> ServeOutput:
        """`submit`, awaited. Cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(prompt, **kwargs))

    def generate(self, prompt, **kwargs) -> ServeOutput:
        """`submit` and wait for the result."""
        return self.submit(prompt, **kwargs).result()

    @property
    def queue_depth(self) -> int:
        """Requests waiting to start (not yet in progress)."""
        return len(self._queue)

    @property
    def in_progress(self) -> int:
        return len(self._active)

    @property
    def closed(self) -> bool:
        return self._closing

    def healthy(self) -> bool:
        """The worker thread is alive and the engine accepts requests."""
        return self._worker.is_alive() and not self._closing

    # ------------------------------------------------------------------ shutdown
    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests, then finish every accepted one (with cancel_pending, fail those not yet
        finished with EngineClosed instead, at the next batch boundary), and stop the worker."""
        with self._cv:
            self._closing = True
            self._abort = self._abort or cancel_pending
            self._cv.notify_all()
        self._worker.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the worker
    def _record(self, hook: str, *args) -> None:
        for r in self._recorders:
            try:
                getattr(r, hook)(*args)
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                pass

    def _finish(self, job: _Job, *, result=None, error: BaseException | None = None, status: str) -> None:
        if job.future.set_running_or_notify_cancel():
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
        else:
            status = "cancelled"
        self._record("on_done", status, time.monotonic() - job.submitted)

    def _purge(self, jobs, now: float) -> list:
        """Remove cancelled and timed-out jobs from `jobs` (a deque or list), settling their futures."""
        keep, gone = [], []
        for job in jobs:
            if job.future.cancelled():
                gone.append((job, "cancelled", None))
            elif job.deadline is not None and now >= job.deadline:
                gone.append((job, "timeout", TimeoutError(f"request timed out after {job.timeout:g} s")))
            else:
                keep.append(job)
        if gone:
            jobs.clear()
            jobs.extend(keep)
            for job, status, error in gone:
                if status == "cancelled":
                    self._record("on_done", "cancelled", now - job.submitted)
                else:
                    self._finish(job, error=error, status=status)
        return keep

    def _work(self) -> None:
        try:
            with torch.inference_mode():
                while self._step():
                    pass
        finally:  # never leave an accepted request unsettled, whatever happened
            with self._cv:
                self._closing = True
                left = list(self._active) + list(self._queue)
                self._active.clear()
                self._queue.clear()
            for job in left:
                self._finish(job, error=EngineClosed("the engine shut down before the request finished"),
                             status="shutdown")

    def _step(self) -> bool:
        """One scheduling round: admit, drop cancelled/expired, run one batch. False when the worker is done."""
        with self._cv:
            while not (self._queue or self._active or self._closing):
                self._cv.wait()
            if self._abort or (self._closing and not self._queue and not self._active):
                return False
            now = time.monotonic()
            self._purge(self._queue, now)
            self._purge(self._active, now)
            admitted = []
            while self._queue and len(self._active) + len(admitted) < self.max_batch:
                admitted.append(self._queue.popleft())
            self._active.extend(admitted)
        for job in admitted:
            self._start(job)
        jobs, wait = self._pick(time.monotonic())
        if jobs:
            self._run(jobs)
        elif wait is not None:
            with self._cv:
                self._cv.wait(wait)
        return True

    def _start(self, job: _Job) -> None:
        """Begin a request: text encoding and its first stage (built now, drawing its random numbers)."""
        job.steps = generate_stages(self.cascade, job.request, _JobObserver(job))
        self._advance(job, None)

    def _advance(self, job: _Job, latents) -> None:
        """Send a request its stage's latents (None: start it): its next stage, or its result."""
        try:
            job.stage = next(job.steps) if latents is None else job.steps.send(latents)
            job.ready_at = time.monotonic()
            if job.error is not None:
                raise job.error
        except StopIteration as done:
            out = done.value
            self._settle(job, result=ServeOutput(out.images, out.image_embeddings, seed=job.seed,
                                                 batch_sizes=dict(job.batch_sizes)), status="ok")
        except BaseException as e:  # noqa: BLE001 - the request's error, not the worker's
            self._settle(job, error=e, status="error")

    def _settle(self, job: _Job, **kw) -> None:
        with self._cv:
            if job in self._active:
                self._active.remove(job)
            self._cv.notify_all()
        job.steps = job.stage = None
        self._finish(job, **kw)

    def _pick(self, now: float):
        """(jobs to run as one batch, None) or ([], seconds to wait for a fuller first-stage batch)."""
        with self._cv:
            ready = [j for j in self._active if j.stage is not None]
        groups: dict = {}
        for j in sorted(ready, key=lambda j: j.ready_at):
            groups.setdefault(stages.batch_key(j.stage), []).append(j)
        if not groups:
            return [], None
        members = min(groups.values(), key=lambda m: (m[0].position, m[0].ready_at))
        batch, rows = [], 0
        for j in members:
            if batch and rows + j.stage.rows > self.max_batch:
                break
            batch.append(j)
            rows += j.stage.rows
        # A young first-stage batch that is not full waits for more arrivals. The worker idles meanwhile:
        # running a later stage instead would leave the newcomers one stage behind, batched apart from it.
        young = self.batch_window - (now - members[0].ready_at)
        room = len(ready) < self.max_batch  # arrivals could still be admitted into this batch
        if members[0].position == 0 and rows < self.max_batch and room and young > 0 and not self._closing:
            return [], young
        return batch, None

    def _run(self, jobs: list) -> None:
        start = time.perf_counter()
        try:
            batch = stages.concat_stages([j.stage for j in jobs])
            x = self.cascade.run(batch, _BatchObserver(jobs))
        except Exception as e:  # noqa: BLE001 - fails this batch's requests; the worker goes on
            for j in jobs:
                self._settle(j, error=e, status="error")
            return
        rows = batch.rows
        self._record("on_batch", batch.name, rows, len(jobs), time.perf_counter() - start)
        for j, xi in zip(jobs, stages.split_rows(x, [j.stage.rows for j in jobs])):
            if j.future.cancelled():  # leaves at the next round (`_purge`); build nothing more for it
                continue
            j.batch_sizes[batch.name] = rows
            j.position += 1
            self._advance(j, xi)
