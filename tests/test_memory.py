"""The memory estimate of one call (unclip.memory): against a measured peak, and its arithmetic."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from unclip import memory
from unclip.presets import build_preset

ROWS = 128

# A fresh process: a warm-up call at one image first (plans, thread pools, allocator arenas), then the measured
# call, with its resident memory sampled from /proc/self/statm by a thread (the peak of the current RSS above
# the level before the call; ru_maxrss is a high-water mark that earlier work may already have set higher).
MEASURE = textwrap.dedent(f"""
    import json, os, threading, torch, unclip
    from unclip.memory import estimate_call_bytes
    torch.set_num_threads(1)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    pipe = unclip.Pipeline.from_preset("tiny", seed=0)
    kw = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2,
              progress=False, output_type="np")
    pipe("warm up", generator=torch.Generator().manual_seed(0), **kw)
    before, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    pipe(["a red square"] * {ROWS}, generator=torch.Generator().manual_seed(0), **kw)
    done.set()
    sampler.join()
    measured = max(peak[0], rss()) - before
    estimate = estimate_call_bytes(pipe.components, {ROWS}, torch.float32,
                                   steps={{"prior": 2, "decoder": 2, "super_res": 2}})
    print(json.dumps({{"measured": measured, "estimate": estimate}}))
""")


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
def test_estimate_is_within_2x_of_the_measured_peak():
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["measured"] > 100 * 2**20  # the call really allocated (activations dominate the noise)
    ratio = result["estimate"] / result["measured"]
    assert 0.5 <= ratio <= 2.0, result


def test_estimate_is_linear_and_monotonic(tiny):
    est = [memory.estimate_call_bytes(tiny, n, torch.float32) for n in range(5)]
    assert est[0] == 0 and all(b > a for a, b in zip(est, est[1:]))
    assert est[4] - est[3] == est[2] - est[1]
    assert memory.estimate_call_bytes(tiny, 4, torch.float16) < est[4]
    assert memory.estimate_call_bytes(tiny, 4, "fp16") == memory.estimate_call_bytes(tiny, 4, torch.float16)
    guided, unguided = (memory.stage_bytes(tiny, 4, torch.float32, guidance=g) for g in (True, False))
    assert unguided["decoder"] < guided["decoder"] and unguided["super_res"] == guided["super_res"]
    assert memory.stage_bytes(tiny, 4, torch.float32, prior_candidates=3)["prior"] > guided["prior"]
    assert memory.estimate_call_bytes(tiny, 4, torch.float32, steps={"super_res": 50}) > est[4]
    stages = memory.stage_bytes(tiny, 4, torch.float32)
    assert set(stages) == {"text_encoder", "prior", "decoder", "super_res", "output"}
    assert max(stages.values()) == est[4]


def test_larger_cascades_need_more(tiny):
    karlo = build_preset("karlo", device="meta")
    dalle2 = build_preset("dalle2", device="meta")
    per_image = [memory.estimate_call_bytes(c, 1, torch.float16) for c in (tiny, karlo, dalle2)]
    assert per_image[0] < per_image[1] < per_image[2]
    # DALL-E 2's last stage works at 1024 px: it dominates that cascade's estimate.
    stages = memory.stage_bytes(dalle2, 1, torch.float16)
    assert max(stages, key=stages.get) == "super_res_2"


def test_max_images_per_call(tiny):
    ten = memory.estimate_call_bytes(tiny, 10, torch.float32)
    assert memory.max_images_per_call(tiny, torch.float32, budget_bytes=ten) == 10
    assert memory.max_images_per_call(tiny, torch.float32, budget_bytes=ten - 1) == 9
    assert memory.max_images_per_call(tiny, torch.float32, budget_bytes=0) == 1  # one image is always tried
    assert memory.max_images_per_call(tiny, torch.float16, budget_bytes=ten) > 10
    limit = memory.max_images_per_call(tiny, torch.float32)  # this machine's available memory
    assert limit >= 1
    assert memory.estimate_call_bytes(tiny, limit, torch.float32) <= memory.available_bytes()
    assert memory.available_bytes() > 0


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="rows"):
        memory.estimate_call_bytes(tiny, -1, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        memory.estimate_call_bytes(tiny, 1, "int8")
    with pytest.raises(TypeError, match="dtype"):
        memory.estimate_call_bytes(tiny, 1, 3)
    with pytest.raises(ValueError, match="budget_bytes"):
        memory.max_images_per_call(tiny, torch.float32, budget_bytes=-5)
