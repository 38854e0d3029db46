"""Document-aware attention over packed blocks: where each document starts, the positions that restart there, and
which next-token targets stay in the loss.

    layout = document_layout(input_ids, bos_token_id=1, eos_token_id=2)
    layout.position_ids      # LongTensor [batch, block]: 0 at each document's first token
    layout.target_mask       # BoolTensor [batch, block - 1]: False where a target is a new document's first token

A packed block holds the end of one document, whole documents, and the start of another, each written as
BOS + text + EOS (see pretrain/data/packing.py; the published tokenized sets use the same layout). A document starts at
the block's first token, at every BOS and right after every EOS. Given these position ids and no attention mask,
transformers' masking code finds the documents itself (position ids that do not go up by one mark a new one) and
builds a block-diagonal causal mask for sdpa, eager and flex attention; flash-attention takes the same position ids
through its variable-length kernel once the batch is laid out as a single row, which `flat_for_varlen` does.
The target that would predict a document's first token from the previous document cannot be learned when the
documents do not see each other, so it is left out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocumentLayout:
    position_ids: torch.Tensor       # [batch, block]
    target_mask: torch.Tensor        # [batch, block - 1]: the targets input_ids[:, 1:] that count

    def targets_per_sequence(self) -> torch.Tensor:
        return self.target_mask.sum(dim=1)


def document_starts(input_ids: torch.Tensor, bos_token_id: int | None, eos_token_id: int | None) -> torch.Tensor:
    """BoolTensor like input_ids: True where a document starts (the first token of each row, every BOS, and every
    token after an EOS)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    if bos_token_id is not None:
        starts |= input_ids == bos_token_id
    if eos_token_id is not None:
        starts[:, 1:] |= input_ids[:, :-1] == eos_token_id
    return starts


def document_layout(input_ids: torch.Tensor, bos_token_id: int | None, eos_token_id: int | None) -> DocumentLayout:
    if bos_token_id is None and eos_token_id is None:
        raise ValueError("document attention needs the tokenizer's BOS or EOS id to find where documents start")
    starts = document_starts(input_ids, bos_token_id, eos_token_id)
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # Each token's distance from the latest start at or before it.
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return DocumentLayout(position_ids=index - last_start, target_mask=~starts[:, 1:])


def flat_for_varlen(input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as one row [1, batch * block], the layout flash-attention's variable-length path reads documents
    from (transformers takes that path only for a batch of one); every row starts at position 0, so rows stay
    apart too."""
    return input_ids.reshape(1, -1), position_ids.reshape(1, -1)
