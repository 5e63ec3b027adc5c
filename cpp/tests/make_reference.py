"""Write the values the C++ unit tests compare against, computed now by the Python reference.

    python cpp/tests/make_reference.py OUT_DIR

plans.json   unclip.samplers.make_plan for a grid of schedules/samplers/steps, and samplers.step outputs
randn.json   torch.randn draws from a seeded CPU torch.Generator, in sequence
hashes/      files of assorted sizes, with hashlib's sha256 in hashes.json
exports/     small fake export folders (manifest + files) for the manifest and hash checks
json.json    a tricky JSON document and what it decodes to
"""
import hashlib
import json
import os
import sys

import torch

from unclip import samplers
from unclip.export.native import FORMAT, FORMAT_VERSION, target_facts

out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def dump(name, obj):
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f)


def floats(t):
    return [float(v) for v in t.reshape(-1).tolist()]


SCHEDULES = [
    {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log",
     "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 5.0},
    {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
     "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0},
    {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
     "variance_type": "fixed_small_log", "prediction_type": "epsilon", "clip_sample": False,
     "clip_sample_range": 1.0},
    {"num_train_timesteps": 37, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log",
     "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0},
]
gen = torch.Generator().manual_seed(1234)
cases = []
for schedule in SCHEDULES:
    cfg = samplers.ScheduleConfig(**schedule)
    T = schedule["num_train_timesteps"]
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("ddim", 1.0)):
        for steps in sorted({1, 2, 7, 25, T} & set(range(1, T + 1))):
            plan = samplers.make_plan(cfg, steps, sampler=sampler, eta=eta)
            coef = {f: floats(getattr(plan, f)) for f in plan.__dataclass_fields__
                    if isinstance(getattr(plan, f), torch.Tensor) and f != "timesteps"}
            case = {"schedule": schedule, "steps": steps, "sampler": sampler, "eta": eta,
                    "timesteps": plan.timestep_values, "prev_timesteps": plan.prev_timestep_values,
                    "draws_noise": plan.draws_noise, "coef": coef}
            if steps in (2, 7):  # sampler steps on random tensors, every step index
                channels = 3
                out_channels = 6 if schedule["variance_type"] == "learned_range" else 3
                checks = []
                for i in range(plan.num_steps):
                    x = torch.randn(2, channels, 4, 4, generator=gen)
                    mo = torch.randn(2, out_channels, 4, 4, generator=gen)
                    if out_channels == 6:
                        mo[:, 3:] = mo[:, 3:].clamp(-1, 1)
                    noise = torch.randn(2, channels, 4, 4, generator=gen) if plan.draws_noise[i] else None
                    y = samplers.step(plan, i, x, mo, noise)
                    checks.append({"i": i, "shape": list(x.shape), "out_shape": list(mo.shape), "x": floats(x),
                                   "model_output": floats(mo), "noise": None if noise is None else floats(noise),
                                   "expected": floats(y)})
                case["steps_checked"] = checks
            cases.append(case)
dump("plans.json", cases)

# Sequential draws from one generator (sizes below and above 16 take different kernel paths).
g = torch.Generator().manual_seed(42)
shapes = [[3], [2, 16], [1, 3, 8, 8], [5], [4, 7]]
dump("randn.json", {"seed": 42, "draws": [{"shape": s, "values": floats(torch.randn(s, generator=g))} for s in shapes]})

# sha256 of assorted sizes (block boundaries 55/56/64 included).
hdir = os.path.join(out, "hashes")
os.makedirs(hdir, exist_ok=True)
hashes = {}
for size in (0, 1, 55, 56, 63, 64, 65, 1000, (1 << 20) + 7):
    data = torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    name = f"f{size}.bin"
    with open(os.path.join(hdir, name), "wb") as f:
        f.write(data)
    hashes[name] = hashlib.sha256(data).hexdigest()
dump("hashes.json", hashes)


# Fake export folders: the manifest fields the C++ reader needs, files with real hashes, and broken variants.
def export(name, mutate=None):
    root = os.path.join(out, "exports", name)
    os.makedirs(os.path.join(root, "prior"), exist_ok=True)
    os.makedirs(os.path.join(root, "tokenizer"), exist_ok=True)
    files = {"prior/model.pt2": b"not really a package", "prior/clip_stats.f32": b"\0" * 32,
             "tokenizer/vocab.json": b"{}"}
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    entry = {rel: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for rel, d in files.items()}
    schedule = SCHEDULES[0]
    nets = {n: {"kind": n, "package": "prior/model.pt2", "files": {k: v for k, v in entry.items() if k.startswith("prior/")},
                "inputs": []} for n in ("text_encoder", "prior", "text_proj", "decoder", "super_res_first")}
    nets["super_res_first"]["kind"] = "super_res"
    arity = {"text_encoder": 1, "prior": 5, "text_proj": 4, "decoder": 5, "super_res": 2}
    for net in nets.values():
        net["inputs"] = [{"name": f"x{k}", "dtype": "float32", "shape": ["batch"]} for k in range(arity[net["kind"]])]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "fp32", "target": target_facts(torch.device("cpu")),
        "max_batch": 8,
        "tokenizer": {"model_max_length": 4, "empty_input_ids": [0, 2, 1, 1], "empty_attention_mask": [1, 1, 0, 0],
                      "files": {"tokenizer/vocab.json": entry["tokenizer/vocab.json"]}},
        "networks": nets,
        "cascade": {"prior_embedding_dim": 4, "prior_scheduler": schedule, "decoder_scheduler": SCHEDULES[1],
                    "decoder_sample_size": 8, "decoder_in_channels": 3, "clip_extra_context_tokens": 4,
                    "clip_stats": "prior/clip_stats.f32",
                    "upsamplers": [{"name": "super_res", "first": "super_res_first", "last": "super_res_first",
                                    "scheduler": SCHEDULES[2], "sample_size": 16, "channels": 3}]},
        "call_defaults": {"prior_guidance_scale": 3.0},
    }
    if mutate:
        mutate(root, manifest)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def other_torch(root, m):
    m["target"]["torch"] = "1.0.0+cpu"


def other_isa(root, m):
    m["target"]["cpu_isa"] = "future512"
    m["target"]["cpu_flags"] = ["unclip_no_such_flag"]


def missing_file(root, m):
    os.remove(os.path.join(root, "tokenizer", "vocab.json"))


def wrong_hash(root, m):
    with open(os.path.join(root, "prior", "clip_stats.f32"), "wb") as f:
        f.write(b"\1" * 32)  # same size, other bytes


def wrong_size(root, m):
    with open(os.path.join(root, "prior", "model.pt2"), "ab") as f:
        f.write(b"!")


def no_decoder(root, m):
    del m["networks"]["decoder"]


for name, mutate in (("good", None), ("other_torch", other_torch), ("other_isa", other_isa),
                     ("missing_file", missing_file), ("wrong_hash", wrong_hash), ("wrong_size", wrong_size),
                     ("no_decoder", no_decoder)):
    export(name, mutate)

tricky = {"s": "a\"b\\c/\n\t\u00e9\u4e2d\U0001F600", "n": [0, -1.5, 1e-30, 12345678901234, 3.4028234663852886e38],
          "b": [True, False, None], "o": {"": {}, "k": []}}
with open(os.path.join(out, "json.json"), "w") as f:
    json.dump({"document": json.dumps(tricky), "expected_string": tricky["s"], "numbers": tricky["n"]}, f)
print(f"wrote {out}")
