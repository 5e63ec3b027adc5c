"""unclip.serve.Engine: stage batching across requests, per-request results, admission control, shutdown;
and the pure batching helpers of unclip.stages (concat_stages, split_rows, batch_key)."""
import asyncio
import threading
import time

import pytest
import torch

from unclip import Observer, Pipeline, stages
from unclip.serve import Engine, EngineClosed, QueueFull

FAST = dict(prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2)
# Batching changes only kernel rounding (rows never mix), which Karlo-style first steps (t = 999) amplify.
# Measured on the toy model, fp32 CPU, image values in [0, 1]: max |Δ| ≤ 2e-5 at 25/25/7 and 3/3/2 (batches
# of 8), 1.3e-4 once at 5/5/3 (a batch of 4). The bound (README "Serving"):
BATCH_TOL = 2e-4


@pytest.fixture(scope="module")
def pipe(one_thread):
    return Pipeline.from_preset("toy")


# --------------------------------------------------------------------------------------------- helpers

def _stage(rows, guided, seed, name="decoder", plan=None):
    g = torch.Generator().manual_seed(seed)
    plan = plan or _stage.plan
    r = 2 * rows if guided else rows
    cond = {"context": torch.randn(r, 5, 4, generator=g), "time_embed": torch.randn(r, 8, generator=g),
            "mask": torch.rand(r, 5, generator=g) > 0.5}
    noise = [torch.randn(rows, 3, 2, 2, generator=g) if n else None for n in plan.draws_noise] \
        if hasattr(plan, "draws_noise") else [torch.randn(rows, 3, 2, 2, generator=g) for _ in range(plan.num_steps)]
    return stages.Stage(name=name, kind="decoder", plan=plan, latents=torch.randn(rows, 3, 2, 2, generator=g),
                        noise=noise, conditioning=cond, networks=("decoder",), guidance=2.0 if guided else None,
                        model_dtype=torch.float32, learned_variance_channels=None)


def _plan():
    from unclip import samplers
    return samplers.make_plan(None, 3)


def test_concat_stages_keeps_the_guided_layout_and_split_rows_undoes_it():
    _stage.plan = _plan()
    a, b, c = _stage(1, True, 0), _stage(2, True, 1), _stage(1, True, 2)
    m = stages.concat_stages([a, b, c])
    assert m.rows == 4 and m.guidance == 2.0 and m.plan is a.plan
    for name in ("context", "time_embed", "mask"):
        # [uncond_a; uncond_b; uncond_c; cond_a; cond_b; cond_c]
        parts = [s.conditioning[name] for s in (a, b, c)]
        want = torch.cat([p[: len(p) // 2] for p in parts] + [p[len(p) // 2:] for p in parts])
        assert torch.equal(m.conditioning[name], want)
    assert torch.equal(m.latents, torch.cat([a.latents, b.latents, c.latents]))
    for i, n in enumerate(m.noise):
        assert (n is None) == (a.noise[i] is None)
        if n is not None:
            assert torch.equal(n, torch.cat([a.noise[i], b.noise[i], c.noise[i]]))
    back = stages.split_rows(m.latents, [s.rows for s in (a, b, c)])
    assert all(torch.equal(x, s.latents) for x, s in zip(back, (a, b, c)))
    with pytest.raises(ValueError, match="cannot be split"):
        stages.split_rows(m.latents, [1, 1])


def test_concat_stages_unguided_and_incompatible():
    _stage.plan = _plan()
    a, b = _stage(1, False, 0), _stage(3, False, 1)
    m = stages.concat_stages([a, b])
    assert torch.equal(m.conditioning["context"], torch.cat([a.conditioning["context"], b.conditioning["context"]]))
    assert stages.concat_stages([a]) is a
    assert stages.batch_key(a) == stages.batch_key(b)
    with pytest.raises(ValueError, match="cannot be batched"):
        stages.concat_stages([a, _stage(1, True, 2)])       # guided with unguided
    with pytest.raises(ValueError, match="cannot be batched"):
        stages.concat_stages([a, _stage(1, False, 3, plan=_plan())])  # another plan object
    with pytest.raises(ValueError, match="at least one"):
        stages.concat_stages([])


# --------------------------------------------------------------------------------------------- results

def test_batched_results_equal_unbatched_per_request(pipe):
    """Every request's images equal `Pipeline.__call__` at its seed alone, whatever it was batched with
    (a negative prompt changes only the request's own uncond rows: it batches with the others)."""
    requests = [("a red circle", 0, 1, None), ("a blue square on the left", 1, 2, None),
                ("two green triangles", 7, 1, "a red circle"), ("a small yellow star", 3, 1, None)]
    with Engine(pipe, max_batch=8, batch_window=1.0) as engine:
        futures = [engine.submit(p, seed=s, num_images_per_prompt=n, output_type="pt", negative_prompt=neg, **FAST)
                   for p, s, n, neg in requests]
        outs = [f.result(timeout=300) for f in futures]
    assert [o.batch_sizes for o in outs] == [{"prior": 5, "decoder": 5, "super_res": 5}] * 4  # all five images
    worst = 0.0
    for (p, s, n, neg), out in zip(requests, outs):
        ref = pipe(p, num_images_per_prompt=n, generator=torch.Generator().manual_seed(s), output_type="pt",
                   progress=False, negative_prompt=neg, **FAST)
        assert out.images.shape == ref.images.shape == (n, 3, 64, 64) and out.seed == s
        worst = max(worst, (out.images - ref.images).abs().max().item())
        assert torch.allclose(out.image_embeddings, ref.image_embeddings, atol=1e-4, rtol=0)
    assert worst <= BATCH_TOL, worst
    plain = pipe("two green triangles", generator=torch.Generator().manual_seed(7), output_type="pt",
                 progress=False, **FAST).images
    assert (plain - outs[2].images).abs().max() > 1e-3  # the negative prompt did reach the cascade


def test_request_alone_is_bit_identical_to_the_pipeline(pipe):
    with Engine(pipe, batch_window=0) as engine:
        out = engine.generate("a red circle", seed=5, output_type="pt", **FAST)
    ref = pipe("a red circle", generator=torch.Generator().manual_seed(5), output_type="pt", progress=False, **FAST)
    assert out.batch_sizes == {"prior": 1, "decoder": 1, "super_res": 1}
    assert torch.equal(out.images, ref.images)


def test_incompatible_settings_are_not_batched_together(pipe):
    with Engine(pipe, max_batch=8, batch_window=1.0) as engine:
        a = engine.submit("a red circle", seed=0, output_type="pt", **FAST)
        b = engine.submit("a red circle", seed=0, output_type="pt", **{**FAST, "decoder_num_inference_steps": 4})
        c = engine.submit("a red circle", seed=0, output_type="pt", **FAST)
        oa, ob, oc = a.result(300), b.result(300), c.result(300)
    assert oa.batch_sizes["prior"] == 3                       # the prior plan is the same for all three
    assert oa.batch_sizes["decoder"] == oc.batch_sizes["decoder"] == 2 and ob.batch_sizes["decoder"] == 1
    assert (oa.images - oc.images).abs().max() == 0           # same seed, same batch: the same image
    assert (oa.images - ob.images).abs().max() > 1e-3         # other decoder steps: another image


# --------------------------------------------------------------------------------------------- observers

class Recorder(Observer):
    wants_steps = True

    def __init__(self, on_start=None):
        self.events = []
        self.on_start = on_start

    def on_stage_start(self, name, stage):
        self.events.append(("start", name, None if stage is None else stage.rows))
        if self.on_start is not None:
            self.on_start(name)

    def on_step(self, stage, i, t, latents):
        self.events.append(("step", stage.name, latents.shape[0]))

    def on_stage_end(self, name, stage, latents):
        self.events.append(("end", name, None if latents is None else latents.shape[0]))


def test_progress_events_per_request(pipe):
    ra, rb = Recorder(), Recorder()
    with Engine(pipe) as engine:
        a = engine.submit("a red circle", seed=0, num_images_per_prompt=2, observer=ra, **FAST)
        b = engine.submit("a blue square", seed=1, observer=rb, **FAST)
        a.result(300), b.result(300)
    for rec, rows in ((ra, 2), (rb, 1)):
        starts = [name for kind, name, _ in rec.events if kind == "start"]
        assert starts == ["text", "prior", "decoder", "super_res"]
        steps = [name for kind, name, _ in rec.events if kind == "step"]
        assert steps == ["prior"] * 3 + ["decoder"] * 3 + ["super_res"] * 2
        assert {r for kind, _, r in rec.events if kind == "step"} == {rows}  # its own rows, not the batch's


def test_an_observer_error_fails_its_request_only(pipe):
    def boom(name):
        if name == "decoder":
            raise RuntimeError("observer says no")
    with Engine(pipe) as engine:
        bad = engine.submit("a red circle", seed=0, observer=Recorder(boom), **FAST)
        good = engine.submit("a red circle", seed=1, **FAST)
        assert len(good.result(300).images) == 1
        with pytest.raises(RuntimeError, match="observer says no"):
            bad.result(300)
        assert engine.healthy()


# --------------------------------------------------------------------------------------------- admission

def test_bad_requests_raise_before_queueing(pipe):
    with Engine(pipe, max_batch=4) as engine:
        with pytest.raises(TypeError, match="unknown request option"):
            engine.submit("x", bogus=1)
        with pytest.raises(ValueError, match="num_images_per_prompt must be in 1..4"):
            engine.submit("x", num_images_per_prompt=5)
        with pytest.raises(ValueError, match="seed must be in"):
            engine.submit("x", seed=-1)
        with pytest.raises(ValueError, match="prior_num_inference_steps"):
            engine.submit("x", prior_num_inference_steps=0)
        with pytest.raises(ValueError, match="prompt must be a str"):
            engine.submit(None)
        with pytest.raises(TypeError, match="prompt must be a str"):
            engine.submit(3)
        with pytest.raises(ValueError, match="timeout"):
            engine.submit("x", timeout=0)
        assert engine.stats.snapshot()["submitted"] == 0 and engine.queue_depth == 0


def _blocking_observer():
    """An observer that holds the worker at the request's text phase until released."""
    started, release = threading.Event(), threading.Event()

    def hold(name):
        if name == "text":
            started.set()
            assert release.wait(60)
    return Recorder(hold), started, release


def test_queue_bound_rejects_with_a_clear_error(pipe):
    obs, started, release = _blocking_observer()
    with Engine(pipe, max_batch=1, max_queue=1) as engine:
        a = engine.submit("a", seed=0, observer=obs, **FAST)
        assert started.wait(60)                       # a is in progress, the queue is empty
        b = engine.submit("b", seed=0, **FAST)          # waits
        with pytest.raises(QueueFull, match="queue is full"):
            engine.submit("c", seed=0, **FAST)
        b.cancel()                                     # a cancelled request frees its queue slot at once
        c = engine.submit("c", seed=0, **FAST)
        release.set()
        a.result(300), c.result(300)
        assert b.cancelled() and engine.stats.snapshot()["rejected"] == {"queue_full": 1}


def test_cancelled_request_frees_its_batch_slot(pipe):
    """A and B run their prior together; B is cancelled during it, so C (waiting) starts at the next batch
    boundary, before A finishes, and B runs no further stage."""
    futures = {}
    rb, rc = Recorder(), Recorder()
    order = []

    def on_a(name):
        order.append(("a", name))
        if name == "prior":
            assert futures["b"].cancel()
    ra = Recorder(on_a)
    rc.on_start = lambda name: order.append(("c", name))
    # the window holds A's prior until B has arrived; then C's prior finds no room to wait for (2 in progress)
    with Engine(pipe, max_batch=2, batch_window=1.0) as engine:
        futures["a"] = engine.submit("a red circle", seed=0, observer=ra, **FAST)
        futures["b"] = engine.submit("a blue square", seed=1, observer=rb, **FAST)
        futures["c"] = engine.submit("two triangles", seed=2, observer=rc, **FAST)
        out_a, out_c = futures["a"].result(300), futures["c"].result(300)
    assert futures["b"].cancelled()
    assert [name for kind, name, _ in rb.events if kind == "start"] == ["text", "prior"]  # nothing after
    # C caught up: its prior ran alone, then its decoder joined A's
    assert out_a.batch_sizes == {"prior": 2, "decoder": 2, "super_res": 2} and out_c.batch_sizes["prior"] == 1
    assert order.index(("c", "prior")) < order.index(("a", "super_res"))
    assert engine.stats.snapshot()["done"] == {"ok": 2, "cancelled": 1}


def test_timed_out_request_frees_its_slot(pipe):
    obs, started, release = _blocking_observer()
    with Engine(pipe, max_batch=1) as engine:
        a = engine.submit("a", seed=0, observer=obs, **FAST)
        assert started.wait(60)
        rb = Recorder()
        b = engine.submit("b", seed=0, timeout=0.05, observer=rb, **FAST)
        c = engine.submit("c", seed=0, **FAST)
        time.sleep(0.1)
        release.set()
        with pytest.raises(TimeoutError, match="timed out after 0.05 s"):
            b.result(300)
        assert len(c.result(300).images) == 1 and len(a.result(300).images) == 1
        assert rb.events == []                         # b never started
        assert engine.stats.snapshot()["done"] == {"ok": 2, "timeout": 1}


# --------------------------------------------------------------------------------------------- shutdown

def test_close_finishes_every_accepted_request(pipe):
    engine = Engine(pipe, max_batch=2)
    futures = [engine.submit(f"prompt {i}", seed=i, **FAST) for i in range(5)]
    engine.close()
    assert all(f.done() for f in futures)
    assert all(len(f.result().images) == 1 for f in futures)
    with pytest.raises(EngineClosed):
        engine.submit("late", **FAST)
    assert not engine.healthy()


def test_close_cancel_pending_fails_the_rest_and_drops_none(pipe):
    obs, started, release = _blocking_observer()
    engine = Engine(pipe, max_batch=2)
    futures = [engine.submit("first", seed=0, observer=obs, **FAST)]
    assert started.wait(60)
    futures += [engine.submit(f"prompt {i}", seed=i, **FAST) for i in range(4)]
    closer = threading.Thread(target=engine.close, kwargs={"cancel_pending": True})
    closer.start()
    time.sleep(0.05)
    release.set()
    closer.join(120)
    assert not closer.is_alive() and all(f.done() for f in futures)
    failed = [f for f in futures if f.exception() is not None]
    assert failed and all(isinstance(f.exception(), EngineClosed) for f in failed)
    done = engine.stats.snapshot()["done"]
    assert sum(done.values()) == 5 and done.get("shutdown") == len(failed)


def test_async_submit(pipe):
    async def main(engine):
        return await asyncio.gather(*(engine.submit_async(p, seed=i, **FAST) for i, p in enumerate("abc")))
    with Engine(pipe, batch_window=1.0) as engine:
        outs = asyncio.run(main(engine))
    assert [o.seed for o in outs] == [0, 1, 2] and all(o.batch_sizes["prior"] == 3 for o in outs)


def test_cancelling_the_awaiting_task_cancels_the_request(pipe):
    obs, started, release = _blocking_observer()

    async def main(engine):
        task = asyncio.ensure_future(engine.submit_async("b", seed=1, **FAST))
        await asyncio.sleep(0.05)
        assert engine.queue_depth == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with Engine(pipe, max_batch=1) as engine:
        a = engine.submit("a", seed=0, observer=obs, **FAST)
        assert started.wait(60)
        asyncio.run(main(engine))
        release.set()
        a.result(300)
    assert engine.stats.snapshot()["done"] == {"ok": 1, "cancelled": 1}
