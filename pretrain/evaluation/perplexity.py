"""Evaluation: the token-weighted loss and perplexity of a model over a whole tokenized test split.

    result = evaluate(accelerator, model, test_split, batch_size=8)   # {"eval_loss", "perplexity", "eval_tokens"}
    result = evaluate(accelerator, model, test_split, batch_size=8, documents=(1, 2))   # documents apart

pre-training.py reports it at every evaluation step and at the end.
"""

from __future__ import annotations

import math

import torch

from pretrain.data.batches import eval_batches
from pretrain.model.document_attention import document_layout
from pretrain.model.loss import causal_lm_token_losses


def evaluate(accelerator, model, test_split, batch_size: int, documents: tuple | None = None) -> dict:
    """Loss as the mean over every token of the whole test split, each row counted once whatever the process count.

    `documents`: the (BOS, EOS) ids of a model trained with document attention, which is evaluated the same way
    (each document apart, its first token not predicted from the one before).

    Every process runs the same number of batches (collective forwards under FSDP never wait on a finished one);
    rows that only pad a batch weigh 0. Each process sums its weighted losses and token counts in float64 and the
    sums are added across processes: the same exact result as gathering every row with gather_for_metrics, without
    depending on where the padding falls.
    """
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for input_ids, weight in eval_batches(test_split, batch_size=batch_size,
                                              process_index=accelerator.process_index,
                                              num_processes=accelerator.num_processes):
            input_ids, weight = input_ids.to(accelerator.device), weight.to(accelerator.device)
            layout = document_layout(input_ids, *documents) if documents else None
            losses = causal_lm_token_losses(model, input_ids, layout)
            targets = input_ids.shape[1] - 1 if layout is None else layout.targets_per_sequence().double()
            totals[0] += (losses.double() * weight).sum()
            totals[1] += (weight.double() * targets).sum()
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return loss_result(float(totals[0] / totals[1]), int(totals[1]))


def loss_result(loss: float, tokens: int) -> dict:
    """The record of an evaluation: its mean loss, the perplexity (capped where exp overflows) and the tokens."""
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": tokens}
