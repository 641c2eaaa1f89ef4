"""The official Qwen3-Reranker scoring procedure, as the model card writes it.

Kept deliberately plain (left padding, full-vocabulary logits, log-softmax over [no, yes]) so that
the engine can be checked against it. Used by the parity tests and by ``bench/engine.py``.
"""

from __future__ import annotations

import torch

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TASK = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction, query, doc):
    if instruction is None:
        instruction = TASK
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


@torch.inference_mode()
def official_scores(model, tokenizer, query, documents, instruction=None, max_length=8192):
    """Yes-probabilities of ``documents`` for ``query``, computed as in the model card."""
    tokenizer.padding_side = "left"
    prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)
    pairs = [format_instruction(instruction, query, doc) for doc in documents]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    # The model card also passes max_length here; with padding=True (pad to the longest) it has no
    # effect, and transformers warns so on every call. Left out: the same tensors, no warning.
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return batch_scores[:, 1].exp().tolist()


@torch.inference_mode()
def official_scores_of_bodies(model, tokenizer, bodies):
    """The model card's procedure from already-tokenized bodies (instruction, query, document ids).

    The same steps as :func:`official_scores` after its truncation: prefix + body + suffix,
    left padding, full-vocabulary logits, log-softmax over [no, yes]. Used to score one window
    of a long document (a body whose document part is exactly that window's ids).
    """
    tokenizer.padding_side = "left"
    prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)
    inputs = {"input_ids": [prefix_tokens + list(body) + suffix_tokens for body in bodies]}
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    batch_scores = model(**inputs).logits[:, -1, :]
    batch_scores = torch.stack([batch_scores[:, token_false_id], batch_scores[:, token_true_id]], dim=1)
    return torch.nn.functional.log_softmax(batch_scores, dim=1)[:, 1].exp().tolist()


def window_body(tokenizer, query, document, start, end, instruction=None):
    """Body ids of the pair whose document part is tokens ``[start, end)`` of ``" " + document``."""
    shared = format_instruction(instruction, query, "")[:-1]  # "...<Document>:" without the space
    return tokenizer.encode(shared, add_special_tokens=False) + tokenizer.encode(
        " " + document, add_special_tokens=False
    )[start:end]
