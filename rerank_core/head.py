"""The yes/no scoring head of Qwen3-Reranker, and the one place a logit becomes a probability.

The model's relevance score is ``softmax([logit_no, logit_yes])[1]`` at the last real token,
which equals ``sigmoid(logit_yes - logit_no)``. Both logits are rows of the LM head applied to the
same hidden state, so only their difference ``w = lm_head[yes] - lm_head[no]`` is needed: one
dot product per pair instead of a 151,669-wide vocabulary projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

YES_TOKEN = "yes"
NO_TOKEN = "no"


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Look up the ids of the "yes" and "no" tokens.

    Returns:
        ``(yes_id, no_id)``.

    Raises:
        ValueError: the tokenizer has no single token for "yes" or "no" (not a Qwen3 vocabulary).
    """
    ids = []
    for token in (YES_TOKEN, NO_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no token {token!r}; Qwen3-Reranker scores need single "
                f"'yes' and 'no' tokens (Qwen3 ids 9693 and 2152)"
            )
        ids.append(token_id)
    return ids[0], ids[1]


class YesNoHead(torch.nn.Module):
    """Maps final hidden states to yes-probabilities.

    The weight is kept in float32 whatever the model's dtype: the difference of two bf16 rows and
    the dot product lose less precision there, at no measurable cost.
    """

    def __init__(self, lm_head_weight: torch.Tensor, yes_id: int, no_id: int):
        super().__init__()
        weight = lm_head_weight[yes_id].float() - lm_head_weight[no_id].float()
        self.register_buffer("weight", weight.detach().clone())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``logit_yes - logit_no`` for hidden states of shape ``(n, hidden_size)``.

        A product and a sum per row rather than a matrix-vector product: the BLAS product picks
        its blocking from ``n``, so a row's logit would depend on how many rows came with it.
        """
        return (hidden.float() * self.weight).sum(dim=-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``logit_yes - logit_no``, shape ``(n,)`` (see :func:`probabilities`)."""
        return self.logits(hidden)


def probabilities(logits: Sequence[float]) -> list[float]:
    """Yes-probabilities in [0, 1] for head logits: ``sigmoid(logit_yes - logit_no)``.

    Computed in float32 from the float32 logits, so the values are those the head produced
    before logits were kept (a float32 logit survives a Python float exactly).
    """
    return torch.sigmoid(torch.tensor(list(logits), dtype=torch.float32)).tolist()
