"""CLIP text and image towers with projection heads (the encoders in front of the unCLIP prior).

State-dict keys equal those of transformers' `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`,
so published checkpoints (Karlo's `text_encoder/`, `image_encoder/`) load strictly. Both towers are the same
pre-norm transformer encoder; the text tower adds a causal mask and pools at the end-of-text token, the image
tower prepends a class token to the patch sequence and pools that token.

Karlo uses CLIP ViT-L/14: text tower 12 layers × 768 wide × 12 heads over 77 positions, image tower 24 layers
× 1024 wide × 16 heads on 224² images in 14² patches; both project to 768.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .layers import Attend

ACTIVATIONS = ("quick_gelu", "gelu")

# Keys every PreTrainedConfig may carry (current and older transformers) that do not change what the encoder
# computes: serialisation bookkeeping, output switches, training-only values (dropout, init scales),
# classification-head and text-generation settings (CLIP's encoders never read them).
_IGNORED_CONFIG_KEYS = (
    # bookkeeping
    "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "torchscript", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task",
    # output switches
    "output_attentions", "output_hidden_states", "return_dict", "output_scores", "return_dict_in_generate",
    # training only
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "tf_legacy_loss",
    # classification head (CLIPForImageClassification only)
    "id2label", "label2id", "num_labels", "problem_type",
    # encoder-decoder / generation settings; CLIP's towers are plain encoders and never read these
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "tie_word_embeddings", "chunk_size_feed_forward", "sep_token_id",
    "decoder_start_token_id", "use_cache",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff", "assistant_confidence_threshold",
    "assistant_lookbehind", "num_assistant_tokens", "num_assistant_tokens_schedule", "target_lookbehind",
)


# ----------------------------------------------------------------------------------------------- configs

def _positive_float(cfg: Config, key: str, default: float) -> float:
    value = cfg.get(key, default, types=(int, float))
    if isinstance(value, bool) or not value > 0:
        raise cfg.error(key, f"= {value!r} must be a positive number")
    return float(value)


class _TowerConfig:
    """What the two towers' configs share: the checks on the keys that name the model, the fields of the
    shared encoder, the unknown-key check and `to_dict`. Subclasses are frozen dataclasses that set
    CLASS_NAME and MODEL_TYPE."""

    # Size keys both towers share, and which `unclip.config.LIMITS` bound each (checked before building).
    SIZE_LIMITS = {"hidden_size": "width", "intermediate_size": "mlp_width", "projection_dim": "width",
                   "num_hidden_layers": "layers", "num_attention_heads": "width"}

    @classmethod
    def _read_encoder_fields(cls, cfg: Config) -> dict:
        """Check the keys that name the model, then read the encoder fields both towers have (as keyword
        arguments for the constructor)."""
        cfg.expect("model_type", (cls.MODEL_TYPE,))
        # Another class named here means another set of weights (e.g. "CLIPTextModel" has no projection).
        architectures = cfg.get("architectures", None, types=(list, type(None)))
        if architectures is not None and architectures != [cls.CLASS_NAME]:
            raise cfg.error("architectures",
                            f"= {architectures!r} is not supported (supported: {[cls.CLASS_NAME]!r})")
        # transformers 4.x could prune heads at load time; pruned checkpoints have other shapes.
        cfg.expect("pruned_heads", ({},))
        d = cls()
        hidden_size = cfg.get_int("hidden_size", d.hidden_size, min_value=1)
        num_heads = cfg.get_int("num_attention_heads", d.num_attention_heads, min_value=1)
        if hidden_size % num_heads:
            raise cfg.error("num_attention_heads", f"= {num_heads} does not divide hidden_size = {hidden_size}")
        return dict(
            hidden_size=hidden_size,
            intermediate_size=cfg.get_int("intermediate_size", d.intermediate_size, min_value=1),
            projection_dim=cfg.get_int("projection_dim", d.projection_dim, min_value=1),
            num_hidden_layers=cfg.get_int("num_hidden_layers", d.num_hidden_layers, min_value=0),
            num_attention_heads=num_heads,
            hidden_act=cfg.get("hidden_act", d.hidden_act, types=str, choices=ACTIVATIONS),
            layer_norm_eps=_positive_float(cfg, "layer_norm_eps", d.layer_norm_eps),
        )

    @classmethod
    def _reject_unknown(cls, cfg: Config, also_ignored: tuple[str, ...] = ()) -> None:
        used = [f.name for f in dataclasses.fields(cls)]
        cfg.reject_unknown(used + ["model_type", "architectures", "pruned_heads"], _IGNORED_CONFIG_KEYS + also_ignored)

    def to_dict(self) -> dict:
        return {"_class_name": self.CLASS_NAME, "architectures": [self.CLASS_NAME], "model_type": self.MODEL_TYPE,
                **dataclasses.asdict(self)}


@dataclass(frozen=True)
class CLIPTextConfig(_TowerConfig):
    """transformers' CLIPTextConfig, as far as inference needs it. Defaults are transformers' own."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Pooling: eos_token_id == 2 marks configs written before transformers fixed the id (PR #24773); those
    # pool at argmax(input_ids), i.e. where the highest id (CLIP's end-of-text, 49407) stands.
    eos_token_id: int = 49407
    # Tokenizer metadata, kept so a saved config round-trips; the forward pass never reads them.
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1

    CLASS_NAME = "CLIPTextModelWithProjection"
    MODEL_TYPE = "clip_text_model"

    @classmethod
    def karlo(cls) -> "CLIPTextConfig":
        """CLIP ViT-L/14 text tower as shipped in Karlo v1 alpha's `text_encoder/` (legacy eos id 2)."""
        return cls(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                   num_attention_heads=12, eos_token_id=2, bos_token_id=0, pad_token_id=1)

    @classmethod
    def from_config(cls, cfg: Config) -> "CLIPTextConfig":
        encoder_fields = cls._read_encoder_fields(cfg)
        d = cls()
        config = cls(
            **encoder_fields,
            vocab_size=cfg.get_int("vocab_size", d.vocab_size, min_value=1),
            max_position_embeddings=cfg.get_int("max_position_embeddings", d.max_position_embeddings, min_value=1),
            # transformers' type allows a list, but its pooling compares ids with one integer.
            eos_token_id=cfg.get_int("eos_token_id", d.eos_token_id),
            bos_token_id=cfg.get("bos_token_id", d.bos_token_id, types=(int, type(None))),
            pad_token_id=cfg.get("pad_token_id", d.pad_token_id, types=(int, type(None))),
        )
        cls._reject_unknown(cfg)
        cfg.check_limits(config, {**cls.SIZE_LIMITS, "vocab_size": "vocab", "max_position_embeddings": "tokens"})
        return config


@dataclass(frozen=True)
class CLIPVisionConfig(_TowerConfig):
    """transformers' CLIPVisionConfig, as far as inference needs it. Defaults are transformers' own."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    CLASS_NAME = "CLIPVisionModelWithProjection"
    MODEL_TYPE = "clip_vision_model"

    @classmethod
    def karlo(cls) -> "CLIPVisionConfig":
        """CLIP ViT-L/14 image tower as in Karlo's image-variation `image_encoder/`."""
        return cls(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                   num_attention_heads=16, image_size=224, patch_size=14)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg: Config) -> "CLIPVisionConfig":
        encoder_fields = cls._read_encoder_fields(cfg)
        d = cls()
        # transformers' type also allows (h, w) pairs, but its embedding code only handles square ints.
        image_size = cfg.get_int("image_size", d.image_size, min_value=1)
        patch_size = cfg.get_int("patch_size", d.patch_size, min_value=1)
        if patch_size > image_size:
            raise cfg.error("patch_size", f"= {patch_size} is larger than image_size = {image_size}")
        config = cls(**encoder_fields, num_channels=cfg.get_int("num_channels", d.num_channels, min_value=1),
                     image_size=image_size, patch_size=patch_size)
        # Older full dumps give the vision tower null token ids; nothing reads them.
        cls._reject_unknown(cfg, also_ignored=("bos_token_id", "eos_token_id", "pad_token_id"))
        cfg.check_limits(config, {**cls.SIZE_LIMITS, "num_channels": "io_channels", "image_size": "sample_size"})
        return config


# ------------------------------------------------------------------------------------------ shared encoder

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.attend = Attend()

    def forward(self, x: torch.Tensor, *, causal: bool, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, width = x.shape
        head_dim = width // self.num_heads

        def heads(t):  # (B, N, width) -> (B, H, N, D)
            return t.view(b, n, self.num_heads, head_dim).transpose(1, 2)

        out = self.attend(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                          causal=causal, key_padding_mask=key_padding_mask, scale=head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(width, num_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x, *, causal=False, key_padding_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), causal=causal, key_padding_mask=key_padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                         config.hidden_act, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers))

    def forward(self, x, *, causal=False, key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, causal=causal, key_padding_mask=key_padding_mask)
        return x


# ------------------------------------------------------------------------------------------------- text

class TextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions 0..L-1: slicing the table equals looking up arange(L) and needs no stored buffer.
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class TextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModelWithProjection(nn.Module):
    """CLIP text tower: causal transformer over token ids, pooled at end-of-text, projected.

    forward(input_ids (B, L) int, attention_mask (B, L) bool True=attend | None)
      -> (text_embeds (B, projection_dim), last_hidden_state (B, L, hidden_size)).
    """

    config_class = CLIPTextConfig
    weights_name = "model.safetensors"
    # transformers < 4.31 stored the position-id buffer in checkpoints.
    ignore_unexpected = (r"^text_model\.embeddings\.position_ids$",)

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token in each row, chosen exactly as transformers chooses it."""
        ids = input_ids.to(torch.int32)  # transformers pools over int32 ids (ONNX-friendly argmax)
        if self.config.eos_token_id == 2:
            # Legacy configs: the end-of-text token has the largest id in the vocabulary.
            return ids.argmax(dim=-1)
        # First occurrence (padding may reuse the eos id); a row without it pools position 0.
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.is_complex() \
                or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got "
                            f"{input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or not 1 <= input_ids.shape[1] <= \
                self.config.max_position_embeddings:
            raise ValueError(f"input_ids must have shape (batch >= 1, length in 1..{self.config.max_position_embeddings}),"
                             f" got {tuple(input_ids.shape)}")
        key_padding_mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
                raise TypeError("attention_mask must be a bool (or 0/1 integer) tensor, True = attend")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)

        tm = self.text_model
        h = tm.embeddings(input_ids)
        h = tm.encoder(h, causal=True, key_padding_mask=key_padding_mask)
        h = tm.final_layer_norm(h)
        rows = torch.arange(h.shape[0], device=h.device)
        pooled = h[rows, self.pool_positions(input_ids).to(h.device)]
        return self.text_projection(pooled), h


# ------------------------------------------------------------------------------------------------ image

class VisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic): the stored name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP image tower: ViT over patches plus a class token, the class token normalised and projected.

    forward(pixel_values (B, C, S, S), already CLIP-normalised)
      -> (image_embeds (B, projection_dim), last_hidden_state (B, 1 + patches, hidden_size)).
    As in transformers, last_hidden_state is the encoder output before `post_layernorm`.
    """

    config_class = CLIPVisionConfig
    weights_name = "model.safetensors"
    ignore_unexpected = (r"^vision_model\.embeddings\.position_ids$",)

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor):
        c, s = self.config.num_channels, self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            raise TypeError("pixel_values must be a floating-point tensor")
        if pixel_values.dim() != 4 or pixel_values.shape[0] < 1 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel_values must have shape (batch >= 1, {c}, {s}, {s}), "
                             f"got {tuple(pixel_values.shape)}")
        vm = self.vision_model
        weight = vm.embeddings.patch_embedding.weight
        h = vm.embeddings(pixel_values.to(dtype=weight.dtype))
        h = vm.encoder(vm.pre_layrnorm(h))
        pooled = vm.post_layernorm(h[:, 0])
        return self.visual_projection(pooled), h
