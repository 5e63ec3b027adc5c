"""CLIP tokenizer: id-for-id parity with transformers' CLIPTokenizer on a vocabulary learned by
`CLIPTokenizer.train`, both folder forms (tokenizer.json; vocab.json + merges.txt) and a folder written by
transformers 5 itself, truncation, decoding, training determinism and error messages."""
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from unclip.config import ConfigError
from unclip.presets import preset_corpus
from unclip.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, byte_alphabet

transformers = pytest.importorskip("transformers")

NUM_MERGES = 3000

# Words beyond plain English, so that merges (and the parity prompts) cover multi-byte UTF-8.
UNICODE_WORDS = [
    "café", "naïve", "Über", "façade", "São Paulo", "Ångström", "crème brûlée", "jalapeño", "Zürich", "Kraków",
    "Ελληνικά", "ΟΔΟΣ", "φωτογραφία", "русский", "Москва", "кошка", "日本語", "東京タワー", "ねこ", "中文字符",
    "北京的猫", "한국어", "고양이", "العربية", "עברית", "हिन्दी", "ภาษาไทย", "🐶", "🐱", "👍🏽", "🇫🇷", "👨‍👩‍👧",
    "❤️", "✨", "ＡＢＣ", "ﬁne", "Ⅻ", "x²", "½", "١٢٣", "e\u0301cole", "İstanbul", "straße", "ǅ",
]
SYMBOLS = ["!", "!!!", "?!", "...", ",", ";", ":", "--", "-", "(", ")", "[x]", "\"", "'", "''", "@", "#1", "$5",
           "%", "&", "*", "+", "=", "/", "\\", "|", "~", "^", "`", "<", ">", "{}", "…", "—", "«", "»", "’", "“”"]
CONTRACTIONS = ["don't", "it's", "we're", "I'll", "they've", "I'm", "he'd", "DON'T", "It'S", "rock'n'roll",
                "'quoted'", "dog's", "can’t", "o'clock", "'s", "''s", "ma'am", "y'all'd've"]
SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000", "\u2009", "\r\n", "\x0b", "\x0c", "\u2028", "\x85"]
ODD = ["\x00", "\x07", "\x1b", "\x7f", "\u200b", "\ufeff", "\u00ad", "\u200d", "\ufe0f", "\x1c", "\U0001F9D1"]


def english_words() -> list[str]:
    return sorted({w for text in preset_corpus() for w in text.replace(",", " ").replace(":", " ").split()})


def varied_corpus() -> list[str]:
    """The presets' corpus plus random sentences mixing every kind of text the parity prompts use."""
    rng = random.Random(1234)
    words = english_words()
    corpus = preset_corpus() + UNICODE_WORDS + CONTRACTIONS
    # Made-up words (Latin, Cyrillic, kana, Hangul syllables) give the merges enough distinct material.
    syllables = ["ka", "lo", "mi", "ter", "ing", "ous", "pre", "sta", "ble", "qu", "ph", "zen", "dor", "vi"]
    for _ in range(1200):
        corpus.append("".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))))
    for lo, hi in ((0x430, 0x44F), (0x3B1, 0x3C9), (0x3041, 0x3093), (0xAC00, 0xAC60), (0x4E00, 0x4E40)):
        for _ in range(150):
            corpus.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(2, 6))))
    for _ in range(1500):
        parts = []
        for _ in range(rng.randint(3, 12)):
            kind = rng.random()
            if kind < 0.6:
                parts.append(rng.choice(words))
            elif kind < 0.75:
                parts.append(rng.choice(UNICODE_WORDS))
            elif kind < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif kind < 0.93:
                parts.append(rng.choice(CONTRACTIONS))
            else:
                parts.append(rng.choice(SYMBOLS))
        corpus.append(" ".join(parts))
    return corpus


def random_prompt(rng: random.Random, words: list[str], max_parts: int = 20) -> str:
    """A prompt with random casing, whitespace, punctuation, numbers, contractions and non-Latin text."""
    out = []
    for _ in range(rng.randint(1, max_parts)):
        kind = rng.random()
        if kind < 0.45:
            w = rng.choice(words)
            style = rng.random()
            w = w.upper() if style < 0.15 else w.capitalize() if style < 0.35 else w
        elif kind < 0.6:
            w = rng.choice(UNICODE_WORDS)
        elif kind < 0.7:
            w = rng.choice([str(rng.randint(0, 99999)), f"{rng.random() * 100:.2f}", f"{rng.randint(1, 9)}th",
                            f"{rng.randint(1, 999):,}000", "4k", "1920x1080"])
        elif kind < 0.8:
            w = rng.choice(CONTRACTIONS)
        elif kind < 0.9:
            w = rng.choice(SYMBOLS) * rng.randint(1, 3)
        elif kind < 0.95:
            w = rng.choice(ODD) + rng.choice(words)
        else:
            w = rng.choice([BOS_TOKEN, EOS_TOKEN, "<|ENDOFTEXT|>", "<|StartOfText|>", "</w>", "<|endoftext"])
        out.append(w)
        out.append(rng.choice(SPACES) if rng.random() < 0.25 else ("" if rng.random() < 0.1 else " "))
    text = "".join(out)
    if rng.random() < 0.2:
        text = rng.choice(SPACES) + text + rng.choice(SPACES)
    return text


HAND_WRITTEN = [
    "", " ", "   ", "\t\n", "\u3000", "\u00a0 \u2009", " \n\t \r\n ", "a", "A", "a photo of a corgi",
    "A PHOTO OF A CORGI", "a Photo Of A cOrGi",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\nand   multiple    spaces",
    "don't stop", "DON'T STOP", "it's the dog's bone", "we're here, they've gone, I'll stay, I'm fine, he'd go",
    "rock'n'roll", "'single quotes'", "\"double quotes\"", "can’t won’t (curly)", "o'clock", "'''s",
    "!!!", "?!?!", "...", "wow!!! really??? yes...", "(parentheses) [brackets] {braces}", "a--b__c~~d",
    "1", "123", "3.14159", "1,000,000", "2nd 3rd 4th", "4k 8k hd 1080p", "year 2024", "x1y2z3",
    "café naïve façade", "Crème Brûlée", "e\u0301cole vs école", "Ångström", "straße STRASSE",
    "İstanbul ıi", "ΟΔΟΣ ΣΑΣ σας", "ǅungla", "ﬁne ﬂow", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "Ⅻ ² ½ ①",
    "日本語のテキスト", "東京タワーと富士山", "中文：你好，世界！", "한국어 문장입니다", "ภาษาไทย",
    "العربية نص", "עברית", "हिन्दी पाठ", "русский текст", "Ελληνικά",
    "🐶🐱🐭", "a 🐶 on a 🛹", "👍🏽👍🏿", "🇫🇷🇯🇵", "👨‍👩‍👧‍👦 family", "❤️ love ✨", "emoji🙂inside",
    "\x00null\x07bell\x1bescape\x7fdel", "zero\u200bwidth", "\ufeffbom", "soft\u00adhyphen", "nbsp\u00a0here",
    "ideographic\u3000space", "line\u2028separator", "next\x85line", "\x1cfile\x1dgroup\x1erecord\x1funit",
    BOS_TOKEN, EOS_TOKEN, f"a {EOS_TOKEN} b", f"x{BOS_TOKEN}y", "<|ENDOFTEXT|>", "<|StartOfText|>",
    f"!!{EOS_TOKEN}!!", "<| endoftext |>", "<|endoftext", "a</w>b", "&amp; &lt;b&gt;", "@user #tag $5 100%",
    "http://example.com/a_b?c=d", "C++ / C# / F#", "snake_case camelCase kebab-case", "a" * 300,
    "supercalifragilisticexpialidocious", "word " * 100, "x, " * 60, "🐶" * 200, "日本" * 500,
    " ".join(["a beautiful oil painting of a castle on a hill at sunset"] * 8), "long " * 3000,
]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    tokenizer = CLIPTokenizer.train(varied_corpus(), NUM_MERGES)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(folder)
    return tokenizer, str(folder)


def _reference(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def reference(learned):
    return _reference(learned[1])


@pytest.fixture(scope="module")
def ours(learned):
    return CLIPTokenizer.from_folder(learned[1])


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    words = english_words()
    generated = [random_prompt(rng, words) for _ in range(220)]
    generated += [random_prompt(rng, words, max_parts=90) for _ in range(20)]   # many past 77 tokens
    return HAND_WRITTEN + generated


def ref_batch(reference, texts, max_length=77):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference(texts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt")


def ours_batch(tokenizer, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(texts)


def _same_rows(got, expected) -> bool:
    return (torch.equal(got.input_ids, expected.input_ids)
            and torch.equal(got.attention_mask, expected.attention_mask.bool()))


# ------------------------------------------------------------------------------------------------ training
def test_trained_vocabulary_has_clip_layout(learned):
    tokenizer, _ = learned
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and not any(c.isspace() for c in alphabet)
    by_id = sorted(tokenizer.vocab, key=tokenizer.vocab.__getitem__)
    assert by_id[:256] == alphabet
    assert by_id[256:512] == [c + "</w>" for c in alphabet]
    assert len(tokenizer.merges) == NUM_MERGES
    merged = by_id[512:-2]
    assert merged == list(dict.fromkeys(a + b for a, b in tokenizer.merges))  # merge order, each token once
    assert by_id[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert tokenizer.eos_token_id == tokenizer.vocab_size - 1 == max(tokenizer.vocab.values())
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77
    assert sorted(tokenizer.vocab.values()) == list(range(tokenizer.vocab_size))
    # Merges cover multi-byte text, so the parity prompts exercise real merges there too.
    assert any(not t.isascii() and len(t) > 2 for t in merged)


TRAIN_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from unclip.presets import preset_corpus
    from unclip.tokenizer import CLIPTokenizer
    corpus = preset_corpus()
    if sys.argv[1] == "reversed":
        corpus = corpus[::-1]
    t = CLIPTokenizer.train(corpus, 300)
    print(hashlib.sha256(json.dumps([t.merges, sorted(t.vocab.items())]).encode()).hexdigest())
""")


def test_training_is_deterministic_across_processes():
    # tokenizers' BpeTrainer breaks ties between equally frequent pairs by token ids that (for the
    # end-of-word tokens) follow hash-map order, which changes from process to process unless declared up
    # front: several fresh processes must learn the same merges.
    digests = {subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, order], capture_output=True, text=True,
                              check=True, timeout=120).stdout.strip()
               for order in ("forward", "reversed", "forward", "reversed")}
    assert len(digests) == 1, digests


def test_training_arguments_and_early_stop():
    with pytest.raises(ValueError, match="num_merges"):
        CLIPTokenizer.train(["a b"], -1)
    with pytest.raises(TypeError, match=r"corpus\[1\]"):
        CLIPTokenizer.train(["ok", 3], 10)
    with pytest.raises(ValueError, match=r"corpus\[0\].*surrogate"):
        CLIPTokenizer.train(["bad \ud800"], 10)
    tiny = CLIPTokenizer.train(["ab ab"], 100)   # runs out of pairs: stops early
    assert tiny.merges == [("a", "b</w>")]
    assert CLIPTokenizer.train("ab ab", 100).merges == tiny.merges
    # The first merge is the corpus's most frequent adjacent pair.
    assert CLIPTokenizer.train(["xy xy xy ab"], 1).merges == [("x", "y</w>")]


# ------------------------------------------------------------------------------------------------ parity
def test_parity_single_prompts(ours, reference, prompts):
    assert len(prompts) >= 300
    mismatches = []
    for text in prompts:
        expected = ref_batch(reference, text)
        got = ours_batch(ours, text)
        assert got.input_ids.dtype == torch.long and got.attention_mask.dtype == torch.bool
        assert got.input_ids.shape == got.attention_mask.shape == (1, 77)
        if not _same_rows(got, expected):
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} prompts differ, e.g. {mismatches[:5]!r}"


def test_parity_batches(ours, reference, prompts):
    rng = random.Random(1)
    start = 0
    while start < len(prompts):
        size = rng.choice([1, 2, 3, 5, 8, 16])
        batch = prompts[start:start + size]
        start += size
        expected = ref_batch(reference, batch)
        got = ours_batch(ours, batch)
        assert _same_rows(got, expected), batch
        lengths = [len(reference(p, add_special_tokens=False).input_ids) for p in batch]
        assert got.truncated == [n > 75 for n in lengths]


def test_encode_and_decode_match_reference(ours, reference, prompts):
    for text in prompts:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        full = [ours.bos_token_id, *ids, ours.eos_token_id]
        assert ours.decode(full) == reference.decode(full), text
        assert ours.decode(full, skip_special_tokens=True) == reference.decode(full, skip_special_tokens=True)
    # Arbitrary id sequences, including ones that split UTF-8 characters (replacement characters).
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 12))]
        assert ours.decode(ids) == reference.decode(ids), ids
        assert ours.decode(torch.tensor(ids, dtype=torch.long)) == reference.decode(ids)
    assert ours.decode([ours.vocab_size + 5, 2**40]) == ""  # unknown ids are skipped


def test_pipeline_is_transformers_clip_pipeline(ours, reference):
    """The normaliser, pre-tokeniser, decoder, post-processor and BPE settings are transformers' own."""
    mine = json.loads(ours.backend.to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert mine[key] == theirs[key], key
    settings = ("type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                "byte_fallback", "ignore_merges")
    assert {k: mine["model"][k] for k in settings} == {k: theirs["model"][k] for k in settings}


def test_unknown_bytes_use_unk(learned, tmp_path):
    """A vocabulary lacking some byte characters: each unknown one becomes unk, exactly as the reference does."""
    tokenizer, _ = learned
    alphabet = byte_alphabet()
    missing = {alphabet[0xC3 - 0x44], "q"}
    missing = {t for t in tokenizer.vocab if t in missing} | {alphabet[100] + "</w>"}
    merges = [(a, b) for a, b in tokenizer.merges if not any(m in a + b or m in (a, b) for m in missing)]
    keep = set(list(tokenizer.vocab)[:512]) | {a + b for a, b in merges} | {BOS_TOKEN, EOS_TOKEN}
    vocab = {t: i for t, i in tokenizer.vocab.items() if t in keep and t not in missing}   # ids keep gaps
    partial = CLIPTokenizer(vocab, merges)
    partial.save(tmp_path)
    reference = _reference(tmp_path)
    for text in ["café queen", "qq éé é", "quiz", "Ãé", "".join(alphabet[100:104])]:
        ids = partial.encode(text)
        assert ids == reference(text, add_special_tokens=False).input_ids, text
    assert partial.unk_token_id in partial.encode("quiz")
    assert partial.vocab_size == max(vocab.values()) + 1


# ------------------------------------------------------------------------------------------------ behaviour
def test_truncation_keeps_eos_and_warns_briefly(ours, reference):
    tail = "zebra on a hill under a purple sky with many tiny stars and a very long rest " * 20
    text = "first " + "cat " * 90 + tail
    with pytest.warns(UserWarning, match="dropped") as record:
        out = ours(["short prompt", text])
    assert len(record) == 1
    message = str(record[0].message)
    dropped = len(ours.encode(text)) - 75
    assert "prompt 1" in message and f"{dropped} tokens" in message
    assert "cat" in message and "first" not in message  # the dropped part's first words, not the start
    assert len(message) < 200 and tail not in message    # never the whole text
    assert out.truncated == [False, True]
    assert out.input_ids[1, -1].item() == ours.eos_token_id
    assert out.attention_mask[1].all() and out.attention_mask[0].sum().item() == 2 + len(ours.encode("short prompt"))
    assert _same_rows(out, ref_batch(reference, ["short prompt", text]))
    # The warning names where the dropped part starts, in the user's own spelling.
    with pytest.warns(UserWarning) as record:
        ours("x " * 75 + "ZEBRA crossing")
    dropped = len(ours.encode("x " * 75 + "ZEBRA crossing")) - 75
    assert "'ZEBRA crossing'" in str(record[0].message) and f"{dropped} tokens" in str(record[0].message)
    # Exactly at the limit: nothing dropped, no warning.
    exact = ours.decode(ours.encode(text)[:75])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ours(exact)
    assert out.truncated == [False] and out.attention_mask.all()


def test_empty_and_whitespace_prompts(ours):
    for text in ("", " ", "\t\n \u3000"):
        out = ours(text)
        assert out.input_ids[0, :2].tolist() == [ours.bos_token_id, ours.eos_token_id]
        assert (out.input_ids[0, 2:] == ours.pad_token_id).all()
        assert out.attention_mask[0].tolist() == [True, True] + [False] * 75


def test_input_validation(ours):
    for bad in (None, 3, b"bytes", {"a": 1}):
        with pytest.raises(TypeError, match="prompt"):
            ours(bad)
    with pytest.raises(TypeError, match=r"prompt\[1\]"):
        ours(["fine", 3])
    with pytest.raises(ValueError, match="prompt"):
        ours([])
    with pytest.raises(TypeError, match="text"):
        ours.encode(None)
    # A lone surrogate (e.g. from a bad decode) is not text: ValueError naming the prompt, not a
    # UnicodeEncodeError or the library's TypeError.
    with pytest.raises(ValueError, match=r"^prompt holds '\\ud800' at character 2"):
        ours("a \ud800 b")
    with pytest.raises(ValueError, match=r"prompt\[1\].*surrogate"):
        ours(["fine", "bad \udfff"])
    with pytest.raises(ValueError, match="text.*surrogate"):
        ours.encode("\ud83d")
    with pytest.raises(ValueError, match=">= 0"):
        ours.decode([-1])
    assert torch.equal(ours(("a", "b")).input_ids, ours(["a", "b"]).input_ids)


# ------------------------------------------------------------------------------------------------ folders
FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def test_save_writes_both_forms_and_round_trips(learned, ours, tmp_path):
    tokenizer, folder = learned
    assert sorted(os.listdir(folder)) == sorted(FILES)
    assert ours.vocab == tokenizer.vocab and ours.merges == tokenizer.merges
    assert ours.added_tokens == tokenizer.added_tokens == {BOS_TOKEN: True, EOS_TOKEN: False}
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        assert f.readline() == "#version: 0.2\n"
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_max_length"] == 77 and config["do_lower_case"] is True and config["errors"] == "replace"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        BOS_TOKEN, EOS_TOKEN, EOS_TOKEN, EOS_TOKEN)
    ours.save(tmp_path)
    for name in FILES:
        with open(os.path.join(folder, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("form", ["tokenizer.json", "vocab+merges"])
def test_each_folder_form_alone_matches_reference(learned, prompts, tmp_path, form):
    _, folder = learned
    keep = ("tokenizer.json", "tokenizer_config.json") if form == "tokenizer.json" else (
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    for name in keep:
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    mine, reference = CLIPTokenizer.from_folder(tmp_path), _reference(tmp_path)
    sample = prompts[::3]
    assert _same_rows(ours_batch(mine, sample), ref_batch(reference, sample))


def test_folder_saved_by_transformers_5(learned, prompts, tmp_path):
    """transformers 5's save_pretrained writes only tokenizer.json + tokenizer_config.json."""
    _, folder = learned
    _reference(folder).save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    mine, reference = CLIPTokenizer.from_folder(tmp_path), _reference(tmp_path)
    assert mine.model_max_length == 77 and mine.added_tokens == {BOS_TOKEN: True, EOS_TOKEN: False}
    assert _same_rows(ours_batch(mine, prompts), ref_batch(reference, prompts))
    mine.save(tmp_path / "again")
    assert _same_rows(ours_batch(CLIPTokenizer.from_folder(tmp_path / "again"), prompts), ref_batch(reference, prompts))


def test_shipped_toy_tokenizer_matches_reference(prompts):
    from unclip.presets import TOY_PATH
    folder = os.path.join(TOY_PATH, "tokenizer")
    assert not os.path.exists(os.path.join(folder, "tokenizer.json"))  # the older form: vocab.json + merges.txt
    assert _same_rows(ours_batch(CLIPTokenizer.from_folder(folder), prompts), ref_batch(_reference(folder), prompts))


def test_reference_loads_saved_folder_identically(learned, reference):
    tokenizer, _ = learned
    assert reference.get_vocab() == tokenizer.vocab
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert reference.model_max_length == 77
    flags = {t.content: t.normalized for t in reference.backend_tokenizer.get_added_tokens_decoder().values()}
    assert flags == tokenizer.added_tokens
    text = ["A Corgi's <|ENDOFTEXT|> 日本 <|startoftext|>!", "x"]
    assert torch.equal(tokenizer(text).input_ids, ref_batch(reference, text).input_ids)


def _entry(content, normalized, **flags):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized,
            "rstrip": False, "single_word": False, **flags}


CONFIG_VARIANTS = {
    # Older CLIP/Karlo layout: AddedToken objects for bos/eos/unk, pad as a plain string.
    "legacy": ({"bos_token": _entry(BOS_TOKEN, True), "eos_token": _entry(EOS_TOKEN, True),
                "unk_token": _entry(EOS_TOKEN, True), "pad_token": EOS_TOKEN, "model_max_length": 77,
                "do_lower_case": True, "errors": "replace", "tokenizer_class": "CLIPTokenizer"},
               {"bos_token": _entry(BOS_TOKEN, True), "eos_token": _entry(EOS_TOKEN, True),
                "unk_token": _entry(EOS_TOKEN, True), "pad_token": EOS_TOKEN}),
    "all_normalized": ({"model_max_length": 77}, {"bos_token": _entry(BOS_TOKEN, True),
                        "eos_token": _entry(EOS_TOKEN, True), "unk_token": _entry(EOS_TOKEN, True),
                        "pad_token": _entry(EOS_TOKEN, True)}),
    "mixed": ({"model_max_length": 40, "eos_token": _entry(EOS_TOKEN, True), "unk_token": EOS_TOKEN,
               "pad_token": _entry(EOS_TOKEN, True)}, None),
    "decoder_wins": ({"model_max_length": 77, "added_tokens_decoder": {}}, {
        "eos_token": _entry(EOS_TOKEN, False), "unk_token": _entry(EOS_TOKEN, False), "pad_token": EOS_TOKEN}),
    "stripping": ({"model_max_length": 77}, {"eos_token": _entry(EOS_TOKEN, False, lstrip=True, rstrip=True)}),
    "no_config": (None, None),
}


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
def test_config_variants_match_reference(learned, tmp_path, variant):
    tokenizer, folder = learned
    config, token_map = CONFIG_VARIANTS[variant]
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    if variant == "decoder_wins":
        config["added_tokens_decoder"] = {
            str(tokenizer.bos_token_id): {**_entry(BOS_TOKEN, False), "special": True},
            str(tokenizer.eos_token_id): {**_entry(EOS_TOKEN, True), "special": True}}
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if token_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(token_map))
    reference = _reference(tmp_path)
    mine = CLIPTokenizer.from_folder(tmp_path)
    flags = {t.content: t.normalized for t in reference.backend_tokenizer.get_added_tokens_decoder().values()}
    assert mine.added_tokens == flags
    length = mine.model_max_length
    texts = [f"A {EOS_TOKEN} b", "<|ENDOFTEXT|> and <|STARTOFTEXT|>", f"{BOS_TOKEN}!{EOS_TOKEN}", "plain",
             f"x  {EOS_TOKEN}  y", " ".join(["long"] * 80)]
    assert _same_rows(ours_batch(mine, texts), ref_batch(reference, texts, max_length=length))


def test_tokenizer_json_without_added_tokens(learned, tmp_path):
    """A minimal tokenizer.json (no added_tokens, no normaliser): the named tokens come from the config and
    the pipeline is CLIP's, as transformers does."""
    _, folder = learned
    data = json.load(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8"))
    data["added_tokens"] = []
    data["normalizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(os.path.join(folder, "tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    mine, reference = CLIPTokenizer.from_folder(tmp_path), _reference(tmp_path)
    texts = ["A <|ENDOFTEXT|> b <|startoftext|>", "Upper Case Words", " ".join(["long"] * 80)]
    assert _same_rows(ours_batch(mine, texts), ref_batch(reference, texts))


def _write_folder(tmp_path, learned, **overrides):
    _, folder = learned
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    for name, content in overrides.items():
        path = tmp_path / name.replace("_json", ".json").replace("_txt", ".txt")
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content, encoding="utf-8")
    return tmp_path


def _tokenizer_json(learned, **model_changes):
    data = json.load(open(os.path.join(learned[1], "tokenizer.json"), encoding="utf-8"))
    for key, value in model_changes.items():
        if key == "top":
            data.update(value)
        else:
            data["model"][key] = value
    return json.dumps(data)


@pytest.mark.parametrize("overrides, file, message", [
    ({"vocab_json": None}, "vocab.json", "not found"),
    ({"merges_txt": None}, "merges.txt", "not found"),
    ({"vocab_json": None, "merges_txt": None}, "", "no tokenizer found"),
    ({"vocab_json": "{not json"}, "vocab.json", "not valid JSON"),
    ({"vocab_json": "[1, 2]"}, "vocab.json", "JSON object"),
    ({"vocab_json": '{"a": -1}'}, "vocab.json", "non-negative"),
    ({"vocab_json": '{"a": "x"}'}, "vocab.json", "non-negative"),
    ({"vocab_json": '{"a": 1e999}'}, "vocab.json", "not valid JSON"),
    ({"merges_txt": "#version: 0.2\na b c\n"}, "merges.txt", "line 2"),
    ({"merges_txt": "#version: 0.2\n\n"}, "merges.txt", "line 2"),
    ({"merges_txt": "#version: 0.2\nq \u4e00\n"}, "", "not in the vocabulary"),
    ({"tokenizer_config_json": "{oops"}, "tokenizer_config.json", "not valid JSON"),
    ({"tokenizer_config_json": '{"model_max_length": 1}'}, "", "model_max_length"),
    ({"tokenizer_config_json": '{"model_max_length": 1000000000000000019884624838656}'}, "", "model_max_length"),
    ({"tokenizer_config_json": '{"added_tokens_decoder": {"3": {"content": "<|endoftext|>"}}}'},
     "tokenizer_config.json", "id 3"),
    ({"tokenizer_config_json": '{"bos_token": {"content": "<|startoftext|>", "lstrip": 1}}'},
     "tokenizer_config.json", "lstrip"),
    ({"tokenizer_config_json": '{"mask_token": "<mask>"}'}, "tokenizer_config.json", "mask_token"),
    ({"special_tokens_map_json": '{"bos_token": 5}'}, "special_tokens_map.json", "bos_token"),
    ({"special_tokens_map_json": '{"bos_token": "<s>"}'}, "", "'<s>' is not in the vocabulary"),
    ({"tokenizer_json": "[]"}, "tokenizer.json", "JSON object"),
    ({"tokenizer_json": '{"model": 3}'}, "tokenizer.json", "'model'"),
    ({"tokenizer_json": '{"model": {"type": "WordPiece"}}'}, "tokenizer.json", "model.type"),
])
def test_bad_folders_raise_clear_errors(tmp_path, learned, overrides, file, message):
    folder = _write_folder(tmp_path, learned, **overrides)
    with pytest.raises(ConfigError) as info:
        CLIPTokenizer.from_folder(folder)
    text = str(info.value)
    assert message in text
    assert str(tmp_path) in text and file in text


@pytest.mark.parametrize("changes, message", [
    ({"end_of_word_suffix": None}, "model.end_of_word_suffix"),
    ({"continuing_subword_prefix": "##"}, "model.continuing_subword_prefix"),
    ({"vocab": [["a", 0.0]]}, "key 'model.vocab' must be an object"),
    ({"merges": "a b"}, "model.merges"),
    ({"merges": [["a"]]}, r"model.merges[0]"),
    ({"merges": [3]}, r"model.merges[0]"),
    ({"top": {"added_tokens": {}}}, "added_tokens"),
    ({"top": {"added_tokens": [{"content": "x"}]}}, r"added_tokens[0]"),
    ({"top": {"added_tokens": [{"id": 3, "content": BOS_TOKEN, "normalized": False}]}}, "has id 3"),
])
def test_bad_tokenizer_json_raises_clear_errors(tmp_path, learned, changes, message):
    (tmp_path / "tokenizer.json").write_text(_tokenizer_json(learned, **changes), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        CLIPTokenizer.from_folder(tmp_path)
    assert message in str(info.value) and "tokenizer.json" in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        CLIPTokenizer.from_folder(tmp_path / "nope")


def test_runtime_tokenizer_does_not_need_regex():
    code = ("import sys, unclip.tokenizer, unclip.presets; unclip.presets.preset_tokenizer()('a b');"
            "print('regex' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
