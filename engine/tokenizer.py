"""CLIP's byte-level BPE tokenizer, bit-exact with transformers 5's `CLIPTokenizer` (the tokenizers backend).

A prompt goes through these steps (each mirrors a stage of the reference pipeline):

1. Added tokens. `<|startoftext|>` / `<|endoftext|>` written inside a prompt become their special ids. A token
   flagged `normalized=False` is found in the raw text; one flagged `normalized=True` is found in the normalised
   text, so `<|STARTOFTEXT|>` matches it too. The text between matches is processed piece by piece.
2. Normalisation: NFC, every whitespace run becomes one space, then per-character lowercasing.
3. Pre-tokenisation with CLIP's regex (contractions, letter runs, single digits, runs of other symbols;
   whitespace is dropped), then GPT-2's byte-level regex on each piece. That second split only matters for the
   `<|endoftext|>` alternative of the first regex: written in another case, `<|ENDOFTEXT|>` becomes `<|`,
   `endoftext`, `|>`.
4. Each piece's UTF-8 bytes are mapped to the 256 printable "byte characters", the last one gets `</w>`, and
   BPE merges are applied lowest rank first, leftmost first.

Where transformers 5 differs from OpenAI's original (ftfy-based) CLIP tokenizer; we follow transformers 5:
- no ftfy text repair (mojibake fixes) and no HTML unescaping: `&amp;` stays `&`, `amp`, `;`;
- whitespace is Unicode White_Space; the original's `re` whitespace class also counted U+001C..U+001F, which
  here are symbols that become tokens;
- the original turned `<|endoftext|>` written in any case into the special id; here that depends on the
  folder's `normalized` flags, as described in step 1 (with the usual layout, `<|ENDOFTEXT|>` stays text).

Known, deliberate limits of the emulation (characters that essentially never occur in prompts):
- NFC uses Python's `unicodedata`; the reference's normalisation tables are older, so a few rare recent combining
  marks may be reordered differently when they sit next to other marks;
- lowercasing and the letter/number classes are pinned to the reference's tables through the two small
  correction tables below; other Unicode-version drift (a newer or older `regex` module) is not corrected.
"""
from __future__ import annotations

import heapq
import os
import tempfile
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import regex
import torch

from .config import ConfigError, read_json
from .weights import write_json

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_MAX_LENGTH = 77
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_NAMED_DEFAULTS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
_CACHE_LIMIT = 100_000
_MAX_LENGTH_LIMIT = 65_536


# --------------------------------------------------------------------------------------------- byte alphabet
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable characters, in CLIP's vocab order.

    Printable Latin-1 bytes map to themselves; the other 68 bytes take the code points from U+0100 upward, so that
    no byte becomes whitespace or a control character inside the BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


# --------------------------------------------------------------------------------------------- normalisation
# Lowercase mappings of Unicode 16/17 that Python's own tables (Unicode 14 in Python 3.11) lack, but the
# reference (Rust's `char::to_lowercase`) applies. Targets are never keys, so a newer Python is unaffected.
_LOWER_ADDITIONS = {
    0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3, 0xA7D4: 0xA7D5,
    0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
    **{cp: cp + 0x20 for cp in range(0x10D50, 0x10D66)},   # Garay capitals
    **{cp: cp + 0x1B for cp in range(0x16EA0, 0x16EB9)},   # Beria Erfe capitals
}
_WHITESPACE = regex.compile(r"\s+")  # `regex`'s \s is Unicode White_Space, the same set as the reference's


def normalize(text: str) -> str:
    """The reference normaliser: NFC, whitespace runs -> one space, lowercase character by character."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE.sub(" ", text)
    # Per character: Python's str.lower() alone would give a final capital sigma the form 'ς'; Rust gives 'σ'.
    return text.replace("Σ", "σ").lower().translate(_LOWER_ADDITIONS)


# --------------------------------------------------------------------------------------------- pre-tokenisation
# Letters (L) and numbers (N) assigned in Unicode 17, which the `regex` module knows but the reference's regex
# engine (Oniguruma, Unicode 16) treats as "other" symbols. Excluding them keeps the three classes identical.
_NEW_LETTERS = ((0x88F, 0x88F), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2),
                (0xA7D4, 0xA7D4), (0xA7F1, 0xA7F1), (0x10940, 0x10959), (0x10EC5, 0x10EC7), (0x11DB0, 0x11DDB),
                (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF3), (0x187F8, 0x187FF),
                (0x18D09, 0x18D1E), (0x18D80, 0x18DF2), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2),
                (0x1E6E4, 0x1E6E5), (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF),
                (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479))
_NEW_NUMBERS = ((0x11DE0, 0x11DE9), (0x16FF4, 0x16FF6))


def _class_ranges(ranges) -> str:
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


_L = f"[^\\P{{L}}{_class_ranges(_NEW_LETTERS)}]"             # a letter the reference knows
_N = f"[^\\P{{N}}{_class_ranges(_NEW_NUMBERS)}]"             # a number the reference knows
_O = f"(?:[^\\s\\p{{L}}\\p{{N}}]|[{_class_ranges(_NEW_LETTERS + _NEW_NUMBERS)}])"  # anything else but space
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
# CLIP's pattern: special-token text, contractions, letter runs, ONE digit, runs of other symbols.
_CLIP_SPLIT = regex.compile(f"<\\|startoftext\\|>|<\\|endoftext\\|>|{_CONTRACTIONS}|{_L}+|{_N}|{_O}+")
# GPT-2's pattern, applied by the reference's byte-level step to every piece of the first split.
_BYTE_LEVEL_SPLIT = regex.compile(f"{_CONTRACTIONS}| ?{_L}+| ?{_N}+| ?{_O}+|\\s+(?!\\S)|\\s+")


def pre_tokenize(normalized: str) -> list[str]:
    """Split normalised text into the words BPE sees (before the byte mapping)."""
    return [word for piece in _CLIP_SPLIT.findall(normalized) for word in _BYTE_LEVEL_SPLIT.findall(piece)]


def _to_byte_chars(word: str) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in word.encode("utf-8"))


# --------------------------------------------------------------------------------------------- output
@dataclass
class TokenizerOutput:
    """`input_ids` (B, L) int64: bos + tokens + eos, then pad ids; `attention_mask` (B, L) bool, True over
    bos..eos; `truncated[i]` says whether prompt i lost tokens to the length limit."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]


# --------------------------------------------------------------------------------------------- tokenizer
class CLIPTokenizer:
    """CLIP's BPE tokenizer. Build with `from_folder` (a transformers `CLIPTokenizer` folder) or `learn_bpe`."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 model_max_length: int = CLIP_MAX_LENGTH, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
                 added_tokens: dict[str, bool] | None = None, source: str = "<tokenizer>"):
        """`added_tokens` maps each token matched inside prompt text to its `normalized` flag; by default the
        four named tokens, flagged as transformers flags them when it loads a folder written by `save`."""
        self.source = source
        if (not isinstance(model_max_length, int) or isinstance(model_max_length, bool)
                or not 2 <= model_max_length <= _MAX_LENGTH_LIMIT):
            # transformers writes int(1e30) to mean "no limit"; every row is padded to this length, so refuse it.
            raise ConfigError(f"{source}: model_max_length = {model_max_length!r} must be an integer in "
                              f"2..{_MAX_LENGTH_LIMIT} (room for the start and end tokens; CLIP uses 77)")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                            ("unk_token", unk_token)):
            if token not in self.vocab:
                raise ConfigError(f"{source}: {name} {token!r} is not in the vocabulary")
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.pad_token_id = self.vocab[pad_token]
        self.unk_token_id = self.vocab[unk_token]
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        if len(self.id_to_token) != len(self.vocab):
            raise ConfigError(f"{source}: the vocabulary gives the same id to several tokens")

        # (left id, right id) -> (rank, merged id); a repeated pair keeps its last rank, as the reference does.
        self._merge_table: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(self.merges):
            for part in (left, right, left + right):
                if part not in self.vocab:
                    raise ConfigError(f"{source}: merge {rank + 1} ({left!r} {right!r}) uses {part!r}, "
                                      "which is not in the vocabulary")
            self._merge_table[(self.vocab[left], self.vocab[right])] = (rank, self.vocab[left + right])

        if added_tokens is None:
            added_tokens = {bos_token: True, eos_token: False}
            for token in (unk_token, pad_token):
                added_tokens.setdefault(token, False)
        for token in added_tokens:
            if token not in self.vocab:
                raise ConfigError(f"{source}: added token {token!r} is not in the vocabulary")
        self.added_tokens = dict(added_tokens)
        self.special_ids = frozenset(self.vocab[t] for t in self.added_tokens)
        # Tokens flagged `normalized` are looked for, in their normalised spelling, in normalised text.
        self._raw_added = _alternation([t for t, normalized in self.added_tokens.items() if not normalized])
        self._normalized_spelling = {normalize(t): t for t, normalized in self.added_tokens.items() if normalized}
        self._normalized_added = _alternation(list(self._normalized_spelling))
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """Load `vocab.json`, `merges.txt` and, when present, `tokenizer_config.json` / `special_tokens_map.json`.

        Without `tokenizer_config.json` the length limit is CLIP's 77 (transformers would not truncate at all)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder}: tokenizer folder not found")
        vocab = _read_vocab(os.path.join(folder, "vocab.json"))
        merges = _read_merges(os.path.join(folder, "merges.txt"))
        config_path = os.path.join(folder, "tokenizer_config.json")
        map_path = os.path.join(folder, "special_tokens_map.json")
        config = read_json(config_path) if os.path.exists(config_path) else {}
        token_map = read_json(map_path) if os.path.exists(map_path) else {}

        # Named tokens: special_tokens_map.json overrides tokenizer_config.json, which overrides CLIP's defaults.
        named = {key: (value, False) for key, value in _NAMED_DEFAULTS.items()}
        for path, data in ((config_path, config), (map_path, token_map)):
            for key in _NAMED_TOKENS:
                if data.get(key) is not None:
                    named[key] = _parse_token(data[key], path, key)
            for key in ("sep_token", "cls_token", "mask_token", "additional_special_tokens"):
                if data.get(key):
                    raise ConfigError(f"{path}: key '{key}' = {data[key]!r} is not supported by CLIP's tokenizer")

        # How transformers ends up flagging each token: it adds the distinct (content, flag) pairs of
        # bos, eos, unk, pad in that order and the last addition of a content wins; an explicit
        # `added_tokens_decoder` entry overrides that.
        added: dict[str, bool] = {}
        seen = set()
        for key in _NAMED_TOKENS:
            if named[key] not in seen:
                seen.add(named[key])
                added[named[key][0]] = named[key][1]
        decoder = config.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise ConfigError(f"{config_path}: key 'added_tokens_decoder' must be an object")
        for index, entry in decoder.items():
            content, normalized = _parse_token(entry, config_path, f"added_tokens_decoder.{index}")
            if not str(index).isdigit() or vocab.get(content) != int(index):
                raise ConfigError(f"{config_path}: added_tokens_decoder gives {content!r} the id {index}, but "
                                  f"vocab.json has {vocab.get(content)!r}")
            added[content] = normalized

        max_length = config.get("model_max_length", CLIP_MAX_LENGTH)
        if isinstance(max_length, float) and max_length.is_integer():
            max_length = int(max_length)
        return cls(vocab, merges, model_max_length=max_length,
                   bos_token=named["bos_token"][0], eos_token=named["eos_token"][0],
                   pad_token=named["pad_token"][0], unk_token=named["unk_token"][0],
                   added_tokens=added, source=folder)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the folder in the layout of openai/clip-vit-large-patch14's tokenizer, which transformers
        loads back to this exact tokenizer."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "vocab.json"), self.vocab)
        _write_text(os.path.join(folder, "merges.txt"),
                    "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in self.merges))

        def entry(token: str) -> dict:
            return {"content": token, "lstrip": False, "normalized": self.added_tokens.get(token, False),
                    "rstrip": False, "single_word": False}

        write_json(os.path.join(folder, "tokenizer_config.json"), {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(self.vocab[t]): {**entry(t), "special": True}
                                     for t in sorted(self.added_tokens, key=self.vocab.__getitem__)},
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
        write_json(os.path.join(folder, "special_tokens_map.json"), token_map)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Rows an embedding table needs: the largest id + 1 (CLIP: 49408, eos being the largest id)."""
        return max(self.vocab.values()) + 1

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab={len(self.vocab)}, merges={len(self.merges)}, "
                f"model_max_length={self.model_max_length})")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without the start/end tokens (special tokens written in the text are kept)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for raw_piece, raw_special in _split_on(self._raw_added, text):
            if raw_special:
                ids.append(self.vocab[raw_piece])
                continue
            for piece, special in _split_on(self._normalized_added, normalize(raw_piece)):
                if special:
                    ids.append(self.vocab[self._normalized_spelling[piece]])
                else:
                    for word in _CLIP_SPLIT.findall(piece):
                        ids.extend(self._encode_word(word))
        return ids

    def __call__(self, prompt: str | Sequence[str]) -> TokenizerOutput:
        """Tokenise prompts as diffusers' unCLIP pipeline does (padding="max_length", truncation=True)."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)):
            prompts = list(prompt)
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise TypeError(f"prompt[{i}] must be a str, got {type(p).__name__}")
            if not prompts:
                raise ValueError("prompt must be a str or a non-empty list of str, got an empty list")
        else:
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")

        length = self.model_max_length
        keep = length - 2
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        truncated = []
        for row, text in enumerate(prompts):
            tokens = self.encode(text)
            truncated.append(len(tokens) > keep)
            if truncated[-1]:
                # Keep the first tokens and still end with eos, as the reference truncates.
                dropped = self.decode(tokens[keep:])
                warnings.warn(f"prompt {row} is longer than the {length} tokens CLIP can handle; "
                              f"this part was dropped: {dropped!r}", stacklevel=2)
                tokens = tokens[:keep]
            ids = [self.bos_token_id, *tokens, self.eos_token_id]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = True
        return TokenizerOutput(input_ids, attention_mask, truncated)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Ids of one piece of CLIP's split (cached: prompts repeat words)."""
        cached = self._cache.get(word)
        if cached is None:
            cached = tuple(i for sub in _BYTE_LEVEL_SPLIT.findall(word) for i in self._bpe(_to_byte_chars(sub)))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = cached
        return cached

    def _bpe(self, chars: str) -> list[int]:
        """Merge the byte characters of one word, lowest merge rank first and leftmost first among equals.

        A heap of candidate merges over a linked list of symbols, like the reference, so that a pathological
        10 000-character word costs O(n log n) rather than O(n^2)."""
        n = len(chars)
        symbols = []
        for i, ch in enumerate(chars):
            token = ch + END_OF_WORD if i == n - 1 else ch
            symbols.append(self.vocab.get(token, self.unk_token_id))
        if n < 2:
            return symbols
        table = self._merge_table
        nxt = list(range(1, n)) + [-1]
        prev = list(range(-1, n - 1))
        alive = [True] * n
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := table.get((symbols[i], symbols[i + 1])))]
        heapq.heapify(heap)
        while heap:
            _, pos, new_id = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right == -1:
                continue
            current = table.get((symbols[pos], symbols[right]))
            if current is None or current[1] != new_id:   # stale entry: a neighbour changed since it was queued
                continue
            symbols[pos] = new_id
            alive[right] = False
            nxt[pos] = nxt[right]
            if nxt[pos] != -1:
                prev[nxt[pos]] = pos
            if prev[pos] != -1 and (m := table.get((symbols[prev[pos]], new_id))):
                heapq.heappush(heap, (m[0], prev[pos], m[1]))
            if nxt[pos] != -1 and (m := table.get((new_id, symbols[nxt[pos]]))):
                heapq.heappush(heap, (m[0], pos, m[1]))
        return [s for s, a in zip(symbols, alive) if a]

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of token ids, as the reference decodes it: word ends become spaces, the ends are stripped,
        invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"ids must be integers, got {type(i).__name__}")
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.id_to_token.get(i)
            if token is None:
                continue  # the reference skips ids it does not know
            if all(c in _CHAR_TO_BYTE for c in token):
                data.extend(_CHAR_TO_BYTE[c] for c in token)
            else:
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


# --------------------------------------------------------------------------------------------- helpers
def _alternation(tokens: list[str]):
    """A regex finding any of `tokens`, longest first at a given position; None when there are none."""
    if not tokens:
        return None
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _split_on(pattern, text: str):
    """(piece, is_match) pairs covering `text`, splitting on the matches of `pattern`; empty pieces dropped."""
    if pattern is None:
        if text:
            yield text, False
        return
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            yield text[start:m.start()], False
        yield m.group(), True
        start = m.end()
    if start < len(text):
        yield text[start:], False


def _parse_token(value, path: str, key: str) -> tuple[str, bool]:
    """(content, normalized) of a special token written as a string or an AddedToken object."""
    if isinstance(value, str):
        return value, False   # transformers adds a plain-string special token with normalized=False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        for flag in ("lstrip", "rstrip", "single_word"):
            if value.get(flag, False):
                raise ConfigError(f"{path}: {key} sets {flag}=true, which CLIP's tokenizer does not use "
                                  "and this engine does not support")
        normalized = value.get("normalized", True)
        if not isinstance(normalized, bool):
            raise ConfigError(f"{path}: {key}.normalized = {normalized!r} must be true or false")
        return value["content"], normalized
    raise ConfigError(f"{path}: {key} = {value!r} must be a string or an object with a string 'content'")


def _read_vocab(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found (a CLIP tokenizer folder needs vocab.json and merges.txt)")
    vocab = read_json(path)
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ConfigError(f"{path}: token {token!r} has id {index!r}; ids must be non-negative integers")
    if not vocab:
        raise ConfigError(f"{path}: the vocabulary is empty")
    return vocab


def _read_merges(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found (a CLIP tokenizer folder needs vocab.json and merges.txt)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e})") from None
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


def _write_text(path: str, text: str) -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------- training
def learn_bpe(corpus: Iterable[str] | str, num_merges: int, *,
              model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Learn a CLIP-layout BPE vocabulary from `corpus` (for random-weight presets; no real vocab is needed).

    Vocabulary order is CLIP's: the 256 byte characters, the same with `</w>`, the merged tokens in merge order,
    then `<|startoftext|>` and `<|endoftext|>` (the largest id). Each step merges the most frequent adjacent pair
    (ties: the lexicographically smallest pair), so the result depends only on the multiset of words. Stops early
    when no pair is left."""
    if isinstance(corpus, str):
        corpus = [corpus]
    if not isinstance(num_merges, int) or isinstance(num_merges, bool) or num_merges < 0:
        raise ValueError(f"num_merges must be an integer >= 0, got {num_merges!r}")

    word_counts: Counter = Counter()
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise TypeError(f"corpus items must be str, item {i} is {type(text).__name__}")
        word_counts.update(_to_byte_chars(w) for w in pre_tokenize(normalize(text)))

    words: list[list[str]] = []
    counts: list[int] = []
    for word, count in sorted(word_counts.items()):
        words.append([*word[:-1], word[-1] + END_OF_WORD])
        counts.append(count)

    pair_counts: Counter = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}

    def account(index: int, sign: int) -> None:
        symbols = words[index]
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += sign * counts[index]
            if sign > 0:
                pair_words.setdefault(pair, set()).add(index)

    for index in range(len(words)):
        account(index, +1)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    alphabet = list(_BYTE_TO_CHAR.values())
    vocab_tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    known = set(vocab_tokens)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # stale heap entry
        merges.append(pair)
        merged = pair[0] + pair[1]
        if merged not in known:   # two different splits can produce the same token; list it once
            known.add(merged)
            vocab_tokens.append(merged)
        touched = set()
        for index in sorted(pair_words.pop(pair, ())):
            symbols = words[index]
            if not any(a == pair[0] and b == pair[1] for a, b in zip(symbols, symbols[1:])):
                continue
            before = set(zip(symbols, symbols[1:]))
            account(index, -1)
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[index] = out
            account(index, +1)
            touched |= before | set(zip(out, out[1:]))
        for p in touched:
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            elif p in pair_counts:
                del pair_counts[p]
    vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    return CLIPTokenizer(vocab, merges, model_max_length=model_max_length, source="learn_bpe")


# --------------------------------------------------------------------------------------------- default corpus
# Caption-like English for the random-weight presets: objects, colours, animals, styles, places.
DEFAULT_CORPUS: tuple[str, ...] = (
    "a photo of a corgi sitting on a red sofa in a sunny living room",
    "an oil painting of a lighthouse on a rocky coast at sunset",
    "a watercolor illustration of a fox in a snowy forest",
    "a high quality photograph of a golden retriever playing in the park",
    "a cute cat wearing a blue hat, digital art",
    "a bowl of ramen with eggs and green onions on a wooden table",
    "an astronaut riding a horse on the moon, highly detailed",
    "a futuristic city skyline at night with neon lights and flying cars",
    "a close-up portrait of an old man with a white beard, studio lighting",
    "a cozy cabin in the mountains covered with snow, warm light in the windows",
    "a vintage car parked on a street in Paris, 35mm film photo",
    "a teddy bear reading a book in a library, children's book illustration",
    "a bright yellow sunflower field under a clear blue sky",
    "a pixel art castle on a hill with a dragon flying above it",
    "a minimalist logo of a mountain and a river, flat vector design",
    "a steaming cup of coffee next to a croissant on a marble counter",
    "an elephant walking across the savanna at dawn, wildlife photography",
    "a colorful parrot perched on a branch in the rainforest",
    "a sailing boat on a calm lake surrounded by pine trees",
    "a robot painting a picture in an art studio, 3d render",
    "a pencil sketch of a girl with long hair looking out of a window",
    "a small wooden house by the sea in the style of Van Gogh",
    "an ancient temple in the jungle overgrown with vines and moss",
    "a plate of fresh strawberries and blueberries, food photography",
    "a black and white photo of a busy train station in the rain",
    "a koala sleeping in a eucalyptus tree",
    "a penguin standing on an iceberg in Antarctica",
    "a tiger resting in tall grass, soft morning light",
    "a horse galloping along the beach during a purple sunset",
    "a glass vase with pink roses on a windowsill",
    "a bicycle leaning against a brick wall covered in graffiti",
    "an underwater scene with a sea turtle, coral reef and tropical fish",
    "a hot air balloon floating over green hills and a village",
    "a cyberpunk street market with glowing signs, cinematic lighting",
    "a medieval knight in silver armor holding a sword, fantasy art",
    "a desert landscape with sand dunes and a camel caravan",
    "a waterfall in a lush valley, long exposure photograph",
    "a bowl of oranges, apples and bananas, still life painting",
    "a white rabbit in a garden full of tulips and daisies",
    "an owl with big orange eyes sitting on a fence at midnight",
    "a snowy owl flying over a frozen river",
    "a happy dog with a frisbee in its mouth on green grass",
    "a panda eating bamboo, cartoon style",
    "a lion with a majestic mane, dramatic portrait",
    "a wolf howling at the full moon on a cold winter night",
    "a squirrel holding an acorn in autumn leaves",
    "a red fox curled up asleep under a maple tree",
    "a giraffe and a zebra drinking at a waterhole",
    "a goldfish swimming in a round glass bowl",
    "a butterfly resting on a lavender flower, macro shot",
    "a city street in Tokyo with cherry blossoms in spring",
    "the Eiffel Tower at night, impressionist painting",
    "a quiet village in the Alps with wooden chalets",
    "a lighthouse in Scotland during a storm with huge waves",
    "New York City skyline reflected in the river at dusk",
    "a Venetian canal with gondolas and old buildings",
    "a bamboo forest in Kyoto with morning mist",
    "an Egyptian pyramid under a starry sky",
    "a Greek island with white houses and blue domes",
    "a farm with a red barn, cows and a tractor",
    "a kitchen with copper pots, herbs and a brick oven",
    "a library with tall shelves, ladders and warm lamps",
    "a bedroom with a large bed, soft pillows and a cat",
    "a classroom with wooden desks and a green chalkboard",
    "a busy cafe with people talking and drinking tea",
    "a garden with a stone fountain, hedges and benches",
    "an airport terminal with large windows and airplanes outside",
    "a spaceship landing on a red planet with two moons",
    "a castle made of candy and chocolate, whimsical illustration",
    "an anime girl with silver hair and violet eyes",
    "a comic book style superhero flying over the city",
    "a low poly model of a tree on a small island",
    "an isometric illustration of a tiny office",
    "a charcoal drawing of hands holding a candle",
    "a stained glass window with a peacock pattern",
    "a mosaic of a dolphin made of small blue tiles",
    "an ukiyo-e print of a great wave and mount Fuji",
    "a claymation figure of a smiling snowman",
    "a pop art poster of a banana in bright colors",
    "a surreal painting of melting clocks in a desert",
    "a matte painting of a floating island with waterfalls",
    "a renaissance portrait of a lady holding an ermine",
    "a baroque cathedral interior with golden ornaments",
    "an art deco building with geometric patterns",
    "a gothic church with tall spires and gargoyles",
    "a photorealistic render of a sports car in a showroom",
    "a blueprint drawing of a steam locomotive",
    "a tattoo design of a rose and a dagger",
    "a children's drawing of a family and a house with crayons",
    "a neon sign that says open in a dark alley",
    "a chessboard with a wooden king and queen",
    "a violin lying on sheet music next to a candle",
    "a pair of red sneakers on a skateboard",
    "a leather backpack with a map and a compass",
    "a pile of old books and a pair of glasses",
    "a laptop, a notebook and a cup of green tea on a desk",
    "a birthday cake with candles and colorful sprinkles",
    "a basket of freshly baked bread and cheese",
    "a silver spoon, a fork and a knife on a white napkin",
    "a crystal ball glowing on a dark wooden table",
    "colors: red, orange, yellow, green, blue, indigo, violet, purple, pink, brown, black, white, gray, "
    "gold, silver, beige, turquoise, teal, cyan, magenta, maroon, navy, olive, crimson, emerald, amber",
    "animals: dog, puppy, cat, kitten, horse, pony, cow, sheep, goat, pig, chicken, duck, goose, swan, eagle, "
    "hawk, sparrow, pigeon, crow, bear, deer, moose, bison, monkey, gorilla, kangaroo, hedgehog, mouse, "
    "hamster, frog, lizard, snake, crocodile, shark, whale, octopus, jellyfish, crab, lobster, bee, ant, spider",
    "styles: photograph, painting, drawing, sketch, illustration, render, cartoon, anime, watercolor, oil, "
    "acrylic, pastel, ink, vector, pixel, voxel, low poly, realistic, abstract, cubist, minimalist, vintage, "
    "retro, futuristic, steampunk, cinematic, dramatic, moody, dreamy, vibrant, muted, glossy, matte",
    "places: beach, ocean, sea, lake, river, forest, jungle, desert, mountain, valley, canyon, cave, island, "
    "city, town, village, street, road, bridge, tunnel, park, garden, museum, stadium, market, harbor, "
    "station, castle, palace, temple, tower, skyscraper, apartment, office, school, hospital, church",
    "objects: chair, table, lamp, clock, mirror, window, door, umbrella, guitar, piano, drum, camera, phone, "
    "bottle, glass, cup, mug, plate, bowl, teapot, kettle, basket, bag, hat, scarf, shoe, boot, ring, "
    "necklace, crown, key, lantern, candle, balloon, kite, ball, toy, doll, robot, rocket, airplane, train",
    "light and weather: sunrise, sunset, twilight, dawn, dusk, fog, mist, rain, snow, storm, thunder, "
    "lightning, rainbow, clouds, stars, galaxy, aurora, shadows, reflections, golden hour, overcast",
    "quality words: beautiful, detailed, intricate, sharp focus, 4k, 8k, hd, award winning, trending, "
    "masterpiece, elegant, epic, simple, clean, soft, bokeh, wide angle, close up, aerial view",
)
