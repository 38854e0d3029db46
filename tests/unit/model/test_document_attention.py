"""Document-aware attention: the layout found in packed blocks, and the loss of a packed block with documents kept
apart equal to its documents' losses computed one document at a time."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import loss
from pretrain.model.document_attention import document_layout
from tests.helpers.models import tiny_llama

BOS, EOS = 1, 2


def packed_block():
    """The end of a document, two whole ones and the start of a fourth, as pretrain/data/packing.py writes them."""
    g = torch.Generator().manual_seed(3)
    words = lambda n: torch.randint(4, 256, (n,), generator=g).tolist()  # noqa: E731
    pieces = [words(5) + [EOS], [BOS] + words(9) + [EOS], [BOS] + words(3) + [EOS], [BOS] + words(6)]
    return pieces, torch.tensor([sum(pieces, [])])


def second_block():
    """A block that opens on BOS, and one that holds a single document (no boundary at all)."""
    g = torch.Generator().manual_seed(4)
    words = lambda n: torch.randint(4, 256, (n,), generator=g).tolist()  # noqa: E731
    return [[BOS] + words(11) + [EOS], [BOS] + words(15)]


def test_layout_restarts_positions_at_every_document_and_drops_the_targets_that_cross_a_boundary():
    ids = torch.tensor([[7, 8, EOS, BOS, 9, EOS, BOS, 5, 6], [BOS, 4, 5, 6, 7, 8, 9, 10, 11]])
    layout = document_layout(ids, bos_token_id=BOS, eos_token_id=EOS)
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2], list(range(9))]
    # Targets are ids[:, 1:]; the ones that are a document's first token (the two BOS of row 0) are left out.
    assert layout.target_mask.tolist() == [[True, True, False, True, True, False, True, True], [True] * 8]
    assert layout.targets_per_sequence().tolist() == [6, 8]
    # EOS alone marks the boundary too (a stream written without BOS).
    eos_only = document_layout(torch.tensor([[7, EOS, 8, 9, EOS, 5]]), bos_token_id=None, eos_token_id=EOS)
    assert eos_only.position_ids.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert eos_only.target_mask.tolist() == [[True, False, True, True, False]]
    with pytest.raises(ValueError, match="BOS or EOS"):
        document_layout(ids, bos_token_id=None, eos_token_id=None)


def one_document_at_a_time(model, pieces):
    """(summed loss, targets) over each document run alone, as its own sequence: nothing else to attend to."""
    total, count = 0.0, 0
    with torch.no_grad():
        for piece in pieces:
            ids = torch.tensor([piece])
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += ids.shape[1] - 1
    return total, count


def batch_and_reference(model):
    pieces_a, block_a = packed_block()
    pieces_b = second_block()
    block_b = torch.tensor([sum(pieces_b, [])])
    assert block_a.shape == block_b.shape
    input_ids = torch.cat([block_a, block_b])
    sums = [one_document_at_a_time(model, pieces) for pieces in (pieces_a, pieces_b)]
    return input_ids, sums


@pytest.mark.parametrize("setting", ["eager", "chunked", "full_logits_installed"])
def test_packed_loss_with_document_attention_equals_the_documents_one_at_a_time(setting):
    model = tiny_llama()
    model.eval()
    input_ids, sums = batch_and_reference(model)
    if setting == "chunked":
        loss.install_fast_loss(model, 7, compile_loss=False)
    elif setting == "full_logits_installed":
        loss.install_fast_loss(model, None, compile_loss=False)
    layout = document_layout(input_ids, bos_token_id=BOS, eos_token_id=EOS)
    with torch.no_grad():
        per_sequence = loss.causal_lm_token_losses(model, input_ids, layout)
        mean = loss.causal_lm_loss(model, input_ids, layout)
        plain = loss.causal_lm_loss(model, input_ids)
    assert layout.targets_per_sequence().tolist() == [count for _, count in sums]
    assert per_sequence.tolist() == pytest.approx([total for total, _ in sums], rel=1e-5)
    expected_mean = sum(t for t, _ in sums) / sum(c for _, c in sums)
    assert mean.item() == pytest.approx(expected_mean, rel=1e-5)
    # Without document attention every token sees the documents before it in its block: another loss.
    assert abs(plain.item() - expected_mean) > 1e-3


def test_chunked_training_loss_and_gradients_with_documents_match_the_eager_ones():
    """The chunked head computes its gradients in the forward; the dropped targets must not reach them."""
    input_ids, _ = batch_and_reference(tiny_llama())
    layout = document_layout(input_ids, bos_token_id=BOS, eos_token_id=EOS)
    results = []
    for chunk_tokens in (None, 5):
        model = tiny_llama()
        if chunk_tokens:
            loss.install_fast_loss(model, chunk_tokens, compile_loss=False)
        model.zero_grad(set_to_none=True)
        value = loss.causal_lm_loss(model, input_ids, layout)
        value.backward()
        results.append((value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss == pytest.approx(eager_loss, rel=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_the_one_row_layout_of_the_varlen_kernel_gives_the_same_losses(monkeypatch):
    """flash-attention reads documents from one row of position ids; the same row through sdpa's packed-sequence
    mask must give what the batch gives, so the flattening loses nothing."""
    model = tiny_llama()
    model.eval()
    input_ids, sums = batch_and_reference(model)
    layout = document_layout(input_ids, bos_token_id=BOS, eos_token_id=EOS)
    monkeypatch.setattr(loss, "uses_varlen_kernel", lambda model: True)
    with torch.no_grad():
        per_sequence = loss.causal_lm_token_losses(model, input_ids, layout)
    assert per_sequence.tolist() == pytest.approx([total for total, _ in sums], rel=1e-5)
