"""CLIP's tokenizer, run by the `tokenizers` library (the backend transformers 5's `CLIPTokenizer` runs).

Folders load in either form transformers writes:
- `tokenizer.json` (transformers 5 writes only this and `tokenizer_config.json`; many Hub repos ship it), or
- `vocab.json` + `merges.txt` (+ `tokenizer_config.json`, `special_tokens_map.json`), the older layout.
`tokenizer.json` wins when both are there. From either form we take the BPE vocabulary, the merges and the
added tokens; the rest of the pipeline is CLIP's own, built here exactly as transformers 5 builds it for
every CLIP folder (whatever normaliser a tokenizer.json names), so ids equal transformers' for any folder:

1. added tokens (`<|startoftext|>`, `<|endoftext|>`) written in a prompt become their ids; one flagged
   `normalized` is also found in the normalised text, so `<|STARTOFTEXT|>` can match it;
2. normalisation: NFC, every whitespace run becomes one space, lowercase;
3. pre-tokenisation: CLIP's split (special-token text, contractions, letter runs, single digits, runs of other
   symbols; whitespace dropped), then GPT-2's byte-level mapping of each piece;
4. BPE with the end-of-word suffix `</w>` on each word's last symbol, unknown symbols -> the unk token;
5. `<|startoftext|>` + tokens + `<|endoftext|>`, truncated to `model_max_length` (77) keeping the end token,
   padded with the pad token.

Like transformers 5 (and unlike OpenAI's original ftfy-based tokenizer) there is no ftfy text repair and no
HTML unescaping. `save` writes both forms, so transformers 4 and 5 (and diffusers) load the folder.

Random-weight presets learn a small vocabulary with `CLIPTokenizer.train` (tokenizers' own BPE trainer).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from .config import ConfigError, read_json
from .files import atomic_write_json, atomic_write_text

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_MAX_LENGTH = 77
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# CLIP's pre-tokenisation split (OpenAI's CLIP; the same pattern transformers gives its CLIP tokenizer).
CLIP_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                      r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_NAMED_DEFAULTS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word")
_MAX_LENGTH_LIMIT = 65_536
_SNIPPET_WORDS = 6
_SNIPPET_CHARS = 48


def byte_alphabet() -> list[str]:
    """CLIP/GPT-2's 256 printable "byte characters" in CLIP's vocabulary order (ids 0..255; the same with
    `</w>` are ids 256..511). Printable Latin-1 bytes stand for themselves, the other 68 bytes take code points
    from U+0100 upward, so no vocabulary entry holds whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return list(table.values())


def _clip_pipeline(model: BPE) -> Tokenizer:
    """A `tokenizers.Tokenizer` over `model` with CLIP's normaliser, pre-tokeniser and decoder."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> BPE:
    return BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
               end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=unk_token)


@dataclass
class TokenizerOutput:
    """`input_ids` (B, L) int64: bos + tokens + eos, then pad ids; `attention_mask` (B, L) bool, True over
    bos..eos; `truncated[i]` says whether prompt i lost tokens to the length limit."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]


def _token(content: str, normalized: bool, **flags) -> AddedToken:
    return AddedToken(content, normalized=normalized, special=True, **{k: flags.get(k, False) for k in _TOKEN_FLAGS})


class CLIPTokenizer:
    """CLIP's BPE tokenizer. Build with `from_folder` (any transformers CLIP tokenizer folder) or `train`."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 model_max_length: int = CLIP_MAX_LENGTH, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
                 added_tokens: Sequence[AddedToken] | None = None, source: str = "<tokenizer>"):
        """`added_tokens` are matched inside prompt text (each with its `normalized` flag); by default the
        named tokens, flagged as transformers flags them when it loads a folder written by `save`."""
        self.source = source
        if (not isinstance(model_max_length, int) or isinstance(model_max_length, bool)
                or not 2 <= model_max_length <= _MAX_LENGTH_LIMIT):
            # transformers writes int(1e30) to mean "no limit"; every row is padded to this length, so refuse it.
            raise ConfigError(f"{source}: model_max_length = {model_max_length!r} must be an integer in "
                              f"2..{_MAX_LENGTH_LIMIT} (room for the start and end tokens; CLIP uses 77)")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        if len(set(self.vocab.values())) != len(self.vocab):
            raise ConfigError(f"{source}: the vocabulary gives the same id to several tokens")
        for rank, (left, right) in enumerate(self.merges):
            for part in (left, right, left + right):
                if part not in self.vocab:
                    raise ConfigError(f"{source}: merge {rank + 1} ({left!r} {right!r}) uses {part!r}, "
                                      "which is not in the vocabulary")
        if added_tokens is None:
            added_tokens = [_token(bos_token, True), _token(eos_token, False)]
            added_tokens += [_token(t, False) for t in dict.fromkeys((unk_token, pad_token)) if t != eos_token]
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token

        for name, token in zip(_NAMED_TOKENS, (bos_token, eos_token, unk_token, pad_token)):
            if token not in self.vocab:
                raise ConfigError(f"{source}: {name} {token!r} is not in the vocabulary")
        backend = _clip_pipeline(_clip_bpe(self.vocab, self.merges, unk_token))
        backend.add_special_tokens(list(added_tokens))
        self.added_tokens = {t.content: t.normalized for t in added_tokens}
        ids = {name: backend.token_to_id(token)
               for name, token in zip(_NAMED_TOKENS, (bos_token, eos_token, unk_token, pad_token))}
        self.bos_token_id, self.eos_token_id = ids["bos_token"], ids["eos_token"]
        self.unk_token_id, self.pad_token_id = ids["unk_token"], ids["pad_token"]
        # The template transformers' CLIPTokenizer uses: <|startoftext|> $A <|endoftext|>.
        backend.post_processor = processors.RobertaProcessing((eos_token, self.eos_token_id),
                                                              (bos_token, self.bos_token_id),
                                                              trim_offsets=False, add_prefix_space=False)
        self._backend = backend
        # A copy that truncates and pads every prompt to model_max_length, as diffusers' pipelines call it.
        self._rows = Tokenizer.from_str(backend.to_str())
        self._rows.enable_truncation(max_length=model_max_length)
        self._rows.enable_padding(length=model_max_length, pad_id=self.pad_token_id, pad_token=pad_token)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """Load `tokenizer.json`, or else `vocab.json` + `merges.txt`, plus `tokenizer_config.json` and
        `special_tokens_map.json` where present. Every problem raises ConfigError naming the file.

        Without `tokenizer_config.json` the length limit is CLIP's 77 (transformers would not truncate at all)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder}: tokenizer folder not found")
        json_path = os.path.join(folder, TOKENIZER_FILE)
        config_path = os.path.join(folder, CONFIG_FILE)
        map_path = os.path.join(folder, SPECIAL_TOKENS_FILE)
        config = read_json(config_path) if os.path.exists(config_path) else {}
        token_map = read_json(map_path) if os.path.exists(map_path) else {}
        if os.path.isfile(json_path):
            vocab, merges, from_file = _read_tokenizer_json(json_path)
            # Tokens a tokenizer.json lists only as added tokens keep their ids as vocabulary entries.
            vocab.update({content: index for content, (index, _) in from_file.items() if content not in vocab})
        elif os.path.isfile(os.path.join(folder, VOCAB_FILE)) or os.path.isfile(os.path.join(folder, MERGES_FILE)):
            vocab = _read_vocab(os.path.join(folder, VOCAB_FILE))
            merges = _read_merges(os.path.join(folder, MERGES_FILE))
            from_file = {}
        else:
            raise ConfigError(f"{folder}: no tokenizer found (a CLIP tokenizer folder holds {TOKENIZER_FILE}, or "
                              f"{VOCAB_FILE} and {MERGES_FILE}); it holds {sorted(os.listdir(folder))}")

        # Named tokens: special_tokens_map.json overrides tokenizer_config.json, which overrides CLIP's defaults.
        named = {key: (value, {"normalized": False}) for key, value in _NAMED_DEFAULTS.items()}
        for path, data in ((config_path, config), (map_path, token_map)):
            for key in _NAMED_TOKENS:
                if data.get(key) is not None:
                    named[key] = _parse_token(data[key], path, key)
            for key in ("sep_token", "cls_token", "mask_token", "additional_special_tokens"):
                if data.get(key):
                    raise ConfigError(f"{path}: key '{key}' = {data[key]!r} is not supported by CLIP's tokenizer")

        # How transformers ends up flagging each token: a tokenizer.json's own added tokens come first; then it
        # adds the distinct (content, flags) pairs of bos, eos, unk, pad in that order (the last addition of a
        # content wins) for tokens the file does not define; an `added_tokens_decoder` entry overrides both.
        added: dict[str, dict] = {content: flags for content, (_, flags) in from_file.items()}
        seen = []
        for key in _NAMED_TOKENS:
            content, flags = named[key]
            if content not in from_file and (content, flags) not in seen:
                seen.append((content, flags))
                added[content] = flags
        decoder = config.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise ConfigError(f"{config_path}: key 'added_tokens_decoder' must be an object")
        for index, entry in decoder.items():
            content, flags = _parse_token(entry, config_path, f"added_tokens_decoder.{index}")
            known = from_file[content][0] if content in from_file else vocab.get(content)
            if not str(index).isdigit() or known != int(index):
                raise ConfigError(f"{config_path}: added_tokens_decoder gives {content!r} the id {index}, but "
                                  f"the vocabulary has {known!r}")
            added[content] = flags

        max_length = config.get("model_max_length", CLIP_MAX_LENGTH)
        if isinstance(max_length, float) and max_length.is_integer() and max_length < 2 ** 53:
            max_length = int(max_length)
        tokenizer = cls(vocab, merges, model_max_length=max_length,
                        bos_token=named["bos_token"][0], eos_token=named["eos_token"][0],
                        pad_token=named["pad_token"][0], unk_token=named["unk_token"][0],
                        added_tokens=[_token(content, **flags) for content, flags in added.items()],
                        source=folder)
        for content, (index, _) in from_file.items():
            if tokenizer._backend.token_to_id(content) != index:
                raise ConfigError(f"{json_path}: added token {content!r} has id {index}, but it gets id "
                                  f"{tokenizer._backend.token_to_id(content)} in this vocabulary")
        return tokenizer

    @classmethod
    def train(cls, corpus: Iterable[str] | str, num_merges: int, *,
              model_max_length: int = CLIP_MAX_LENGTH) -> "CLIPTokenizer":
        """Learn a CLIP-layout BPE vocabulary from `corpus` with tokenizers' BpeTrainer (for random-weight
        presets; no real vocabulary is needed). Deterministic: the same corpus gives the same tokenizer.

        Vocabulary order is CLIP's: the 256 byte characters, the same with `</w>`, the merged tokens in merge
        order, then `<|startoftext|>` and `<|endoftext|>` (the largest id, which CLIP's legacy pooling relies
        on). Stops early when no pair is left to merge."""
        if isinstance(corpus, str):
            corpus = [corpus]
        if not isinstance(num_merges, int) or isinstance(num_merges, bool) or not 0 <= num_merges <= 1_000_000:
            raise ValueError(f"num_merges must be an integer in 0..1000000, got {num_merges!r}")
        texts = list(corpus)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"corpus items must be str, corpus[{i}] is {type(text).__name__}")
            _check_encodable(text, f"corpus[{i}]")
        alphabet = byte_alphabet()
        suffixed = [c + END_OF_WORD for c in alphabet]
        # The suffixed characters are declared up front so that their ids, which break ties between equally
        # frequent pairs, do not depend on hash-map order (tokenizers issue #1794): without this, two runs on
        # the same corpus can learn different merges.
        trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + num_merges, min_frequency=0,
                                      show_progress=False, special_tokens=suffixed, initial_alphabet=alphabet,
                                      end_of_word_suffix=END_OF_WORD)
        scratch = _clip_pipeline(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
        scratch.train_from_iterator(texts, trainer)
        learned = json.loads(scratch.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned][:num_merges]
        tokens = alphabet + suffixed + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
        vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
        return cls(vocab, merges, model_max_length=model_max_length, source="CLIPTokenizer.train")

    def save(self, folder: str | os.PathLike) -> None:
        """Write both folder forms: `tokenizer.json` (what transformers 5 reads first) and the layout of
        openai/clip-vit-large-patch14's tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`,
        `special_tokens_map.json`). Each file is written atomically."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, TOKENIZER_FILE), self._backend.to_str(pretty=True) + "\n")
        atomic_write_json(os.path.join(folder, VOCAB_FILE), self.vocab)
        atomic_write_text(os.path.join(folder, MERGES_FILE),
                          "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in self.merges))
        tokens = self._backend.get_added_tokens_decoder()

        def entry(token: str) -> dict:
            spec = next((t for t in tokens.values() if t.content == token), None)
            return {"content": token, "lstrip": bool(spec and spec.lstrip),
                    "normalized": bool(spec and spec.normalized), "rstrip": bool(spec and spec.rstrip),
                    "single_word": bool(spec and spec.single_word)}

        atomic_write_json(os.path.join(folder, CONFIG_FILE), {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): {**entry(t.content), "special": bool(t.special)}
                                     for i, t in sorted(tokens.items())},
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": self.eos_token,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": self.unk_token,
        })
        token_map = {"bos_token": entry(self.bos_token), "eos_token": entry(self.eos_token),
                     "unk_token": entry(self.unk_token)}
        token_map["pad_token"] = self.pad_token if self.pad_token == self.eos_token else entry(self.pad_token)
        atomic_write_json(os.path.join(folder, SPECIAL_TOKENS_FILE), token_map)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` doing the work (no truncation or padding set; do not modify it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Rows an embedding table needs: the largest id + 1 (CLIP: 49408, eos being the largest id)."""
        return max(self._backend.get_vocab(with_added_tokens=True).values()) + 1

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab={len(self)}, merges={len(self.merges)}, "
                f"model_max_length={self.model_max_length})")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without the start/end tokens (special tokens written in the text are kept)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        _check_encodable(text, "text")
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(self, prompt: str | Sequence[str]) -> TokenizerOutput:
        """Tokenise prompts as diffusers' unCLIP pipeline does (padding="max_length", truncation=True).
        A prompt longer than `model_max_length` tokens keeps its start and warns (UserWarning) how much went."""
        if isinstance(prompt, str):
            prompts, names = [prompt], ["prompt"]
        elif isinstance(prompt, (list, tuple)):
            prompts = list(prompt)
            names = [f"prompt[{i}]" for i in range(len(prompts))]
            for name, p in zip(names, prompts):
                if not isinstance(p, str):
                    raise TypeError(f"{name} must be a str, got {type(p).__name__}")
            if not prompts:
                raise ValueError("prompt must be a str or a non-empty list of str, got an empty list")
        else:
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        for name, p in zip(names, prompts):
            _check_encodable(p, name)

        rows = [self._rows.encode(p) for p in prompts]  # one by one: encode_batch would start a thread pool
        input_ids = torch.tensor([r.ids for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([r.attention_mask for r in rows], dtype=torch.bool)
        truncated = [bool(r.overflowing) for r in rows]
        for row, (text, encoding) in enumerate(zip(prompts, rows)):
            if encoding.overflowing:
                self._warn_truncated(row, text, encoding)
        return TokenizerOutput(input_ids, attention_mask, truncated)

    def _warn_truncated(self, row: int, text: str, encoding) -> None:
        """Say how many tokens were dropped and where the dropped part starts, never the whole text."""
        added = self._backend.num_special_tokens_to_add(False)
        dropped = sum(sum(o.attention_mask) - added for o in encoding.overflowing)
        start = encoding.overflowing[0].offsets[1][0]  # the first dropped token (index 0 is the start token)
        words = text[start:].split()
        snippet = " ".join(words[:_SNIPPET_WORDS])
        if len(snippet) > _SNIPPET_CHARS or len(words) > _SNIPPET_WORDS:
            snippet = snippet[:_SNIPPET_CHARS].rstrip() + " ..."
        warnings.warn(f"prompt {row} is longer than the {self.model_max_length} tokens CLIP reads: its last "
                      f"{dropped} tokens were dropped, from {snippet!r}", stacklevel=3)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of token ids, as transformers' CLIPTokenizer decodes: word ends become spaces, the ends are
        stripped, invalid UTF-8 becomes U+FFFD, ids outside the vocabulary are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"ids must be integers, got {type(i).__name__}")
            if i < 0:
                raise ValueError(f"ids must be >= 0, got {i}")
        known = [i for i in ids if i < 2 ** 32]
        text = self._backend.decode(known, skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()


# --------------------------------------------------------------------------------------------- helpers
def _check_encodable(text: str, name: str) -> None:
    """Python strings may hold lone surrogates (e.g. from a bad decode), which are not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} holds {text[e.start]!r} at character {e.start}, a lone surrogate that is not "
                         "valid Unicode text; fix the string's decoding") from None


def _parse_token(value, path: str, key: str) -> tuple[str, dict]:
    """(content, AddedToken flags) of a special token written as a string or an AddedToken object."""
    if isinstance(value, str):
        return value, {"normalized": False}  # transformers adds a plain-string special token unnormalised
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {"normalized": value.get("normalized", True)}
        flags.update({k: value.get(k, False) for k in _TOKEN_FLAGS})
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise ConfigError(f"{path}: {key}.{name} = {flag!r} must be true or false")
        return value["content"], flags
    raise ConfigError(f"{path}: {key} = {value!r} must be a string or an object with a string 'content'")


def _check_vocab(vocab, path: str, what: str) -> dict[str, int]:
    if not isinstance(vocab, dict):
        raise ConfigError(f"{path}: {what} must be an object of token -> id, got {type(vocab).__name__}")
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2 ** 31:
            raise ConfigError(f"{path}: token {token!r} has id {index!r}; ids must be non-negative integers")
    if not vocab:
        raise ConfigError(f"{path}: the vocabulary is empty")
    return vocab


def _read_vocab(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found (a CLIP tokenizer folder needs {TOKENIZER_FILE}, or "
                          f"{VOCAB_FILE} and {MERGES_FILE})")
    return _check_vocab(read_json(path), path, "the file")


def _read_merges(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found (a CLIP tokenizer folder needs {TOKENIZER_FILE}, or "
                          f"{VOCAB_FILE} and {MERGES_FILE})")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConfigError(f"{path}: line {number} = {line!r} is not a merge (expected two tokens "
                              "separated by one space)")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, tuple[int, dict]]]:
    """(vocab, merges, {added token: (id, flags)}) of a tokenizer.json holding a CLIP-style BPE model."""
    data = read_json(path)
    model = data.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: key 'model' must be an object (the BPE model)")
    if model.get("type", "BPE") != "BPE":
        raise ConfigError(f"{path}: key 'model.type' = {model.get('type')!r} is not supported (CLIP's tokenizer "
                          "is 'BPE')")
    if model.get("end_of_word_suffix") != END_OF_WORD:
        raise ConfigError(f"{path}: key 'model.end_of_word_suffix' = {model.get('end_of_word_suffix')!r} is not "
                          f"CLIP's {END_OF_WORD!r}")
    if model.get("continuing_subword_prefix") not in ("", None):
        raise ConfigError(f"{path}: key 'model.continuing_subword_prefix' = "
                          f"{model.get('continuing_subword_prefix')!r} is not CLIP's (none)")
    vocab = _check_vocab(model.get("vocab"), path, "key 'model.vocab'")
    raw_merges = model.get("merges", [])
    if not isinstance(raw_merges, list):
        raise ConfigError(f"{path}: key 'model.merges' must be a list")
    merges = []
    for number, merge in enumerate(raw_merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if (not isinstance(parts, (list, tuple)) or len(parts) != 2
                or not all(isinstance(p, str) and p for p in parts)):
            raise ConfigError(f"{path}: key 'model.merges[{number}]' = {merge!r} is not a merge (two tokens)")
        merges.append((parts[0], parts[1]))
    entries = data.get("added_tokens", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: key 'added_tokens' must be a list")
    added = {}
    for number, entry in enumerate(entries):
        key = f"added_tokens[{number}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or isinstance(entry.get("id"), bool):
            raise ConfigError(f"{path}: key '{key}' = {entry!r} must be an object with an integer 'id'")
        content, flags = _parse_token(entry, path, key)
        added[content] = (entry["id"], flags)
    return vocab, merges, added
