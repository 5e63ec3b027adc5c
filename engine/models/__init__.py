"""Reference PyTorch models of every stage of the cascade, state-dict compatible with diffusers/transformers."""
from __future__ import annotations

import os

import torch

from ..config import Config
from ..weights import load_into, read_state_dict, save_state_dict, write_json


def load_model(folder: str, model_cls, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build `model_cls` from `folder/config.json` and load its weights strictly (see unclip.weights)."""
    config = model_cls.config_class.from_config(Config.from_file(os.path.join(folder, "config.json")))
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = model_cls(config)
    state = read_state_dict(folder)
    load_into(model, state, folder, dtype=dtype, device=device,
              ignore_unexpected=getattr(model_cls, "ignore_unexpected", ()))
    return model.eval().requires_grad_(False)


def save_model(model, folder: str, dtype: torch.dtype | None = None) -> None:
    """Write `folder/config.json` and the weights file, in the layout the reference libraries read."""
    save_state_dict(model, folder, model.weights_name, dtype=dtype)
    write_json(os.path.join(folder, "config.json"), model.config.to_dict())
