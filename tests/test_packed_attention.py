"""Tests for igpt/model/attention.py's sdpa path for packed documents: segments grouped by length, no dense mask.

The reference is the dense-mask path the sdpa backend used before: one ``(B, 1, S, S)`` boolean mask (causal and same
document) passed to ``scaled_dot_product_attention``. The new path must equal it within 1e-5 in fp32, forward and
gradients of q, k and v, for rows whose documents cross row boundaries (restarting at the row start) and rows that
hold whole documents, with GQA and odd lengths; and a whole model's loss and gradients must not change.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import igpt.model.transformer as transformer_mod
from igpt.config import ModelConfig
from igpt.model import Transformer
from igpt.model.attention import PAD_FRACTION, PAD_TOKENS, attention, attention_info, group_segments


def dense_mask_attention(q, k, v, position_ids):
    """The old sdpa path: q ``(B, S, Hq, D)``, k, v ``(B, S, Hkv, D)``, a dense causal same-document mask."""
    doc = torch.cumsum(position_ids == 0, dim=-1)  # (B, S)
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()  # (S, S)
    mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, S, S)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2)  # (B, S, Hq, D)


def packed_positions(b: int, s: int, lengths: list[int], crossing: bool) -> torch.Tensor:
    """``(b, s)`` position ids of documents with these ``lengths`` (cycled).

    ``crossing``: one stream cut into rows, a document crossing a row end restarts at 0 at the next row's start (the
    loader's text packing). Otherwise each row holds whole documents (one longer than the row is truncated) and ends
    in a padding segment (the SFT packing); row r starts with document r.
    """
    if crossing:
        stream: list[int] = []
        i = 0
        while len(stream) < b * s:
            stream.extend(range(lengths[i % len(lengths)]))
            i += 1
        flat = torch.tensor(stream[: b * s]).view(b, s)  # (b, s)
        doc = torch.cumsum(flat == 0, dim=1)  # (b, s)
        return torch.where(doc == 0, flat - flat[:, :1], flat)
    rows = []
    for r in range(b):
        row: list[int] = []
        for i in range(r, r + len(lengths)):
            n = min(lengths[i % len(lengths)], s)
            if len(row) + n > s:
                break
            row.extend(range(n))
        rows.append(row + list(range(s - len(row))))  # the padding restarts at 0: a segment of its own
    return torch.tensor(rows)


def _qkv(b, s, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g, requires_grad=True)
    k = torch.randn(b, s, hkv, d, generator=g, requires_grad=True)
    v = torch.randn(b, s, hkv, d, generator=g, requires_grad=True)
    return q, k, v, torch.randn(b, s, hq, d, generator=g)


def assert_matches_dense(pos: torch.Tensor, hq: int, hkv: int, d: int, seed: int) -> None:
    """The sdpa path on ``pos`` equals the dense-mask path within 1e-5: output and the gradients of q, k, v."""
    q, k, v, grad = _qkv(*pos.shape, hq, hkv, d, seed)
    results = []
    for out in (attention(q, k, v, pos, "sdpa"), dense_mask_attention(q, k, v, pos)):
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("crossing", [True, False], ids=["crossing-rows", "whole-documents"])
@pytest.mark.parametrize(
    "b,s,hq,hkv,d,lengths",
    [
        (2, 97, 4, 4, 16, [13, 40, 7, 61, 1, 22]),  # odd lengths, a one-token document
        (3, 131, 6, 2, 32, [50, 49, 47, 3, 120, 8, 9]),  # GQA 3, lengths that group with padding
        (1, 255, 8, 1, 8, [100, 33, 33, 33, 17, 2]),  # GQA 8 (MQA), equal lengths
        (4, 64, 4, 2, 16, [64, 200]),  # documents as long as the row, and longer
    ],
)
def test_sdpa_packed_equals_dense_mask(b, s, hq, hkv, d, lengths, crossing):
    assert_matches_dense(packed_positions(b, s, lengths, crossing), hq, hkv, d, seed=s)


def test_sdpa_edge_layouts_equal_dense_mask():
    """Every token its own segment (the trainer's dummy batch), rows starting mid-document, one row unpacked."""
    assert_matches_dense(torch.zeros(2, 9, dtype=torch.long), 4, 2, 8, seed=0)
    assert_matches_dense(torch.tensor([[3, 4, 5, 0, 1, 2, 0], [9, 0, 1, 2, 3, 4, 5]]), 4, 2, 8, seed=1)
    unpacked_and_packed = torch.stack([torch.arange(11), torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5])])
    assert_matches_dense(unpacked_and_packed, 4, 2, 8, seed=2)


def test_group_segments_covers_each_segment_once_within_the_padding_bound():
    rng = random.Random(0)
    lengths = [rng.randint(1, 4000) for _ in range(300)] + [1] * 20 + [4000] * 3
    groups = group_segments(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = lengths[g[0]]
        assert all(
            lengths[i] <= longest and longest - lengths[i] <= max(longest // PAD_FRACTION, PAD_TOKENS) for i in g
        )
    assert len(groups) < 40  # a few dozen SDPA calls for 323 segments, not one per segment


def test_padded_layout_puts_each_segment_in_one_row_of_its_group():
    pos = packed_positions(3, 200, [37, 5, 90, 12, 64, 1, 150], crossing=True)
    info = attention_info(pos, "sdpa")
    n_tokens = pos.numel()
    total = sum(n * p for n, p in info.groups)
    assert info.slots.shape == (n_tokens,) and len(set(info.slots.tolist())) == n_tokens  # one slot per token
    # each segment's tokens sit in consecutive slots from the start of one row (length P) of its group
    starts = [0] + torch.cumsum(torch.tensor([n * p for n, p in info.groups]), 0).tolist()
    cu = info.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        slots = info.slots[a:b]
        assert torch.equal(slots, torch.arange(slots[0], slots[0] + b - a))
        g = max(i for i, start in enumerate(starts[:-1]) if start <= slots[0])
        row_len = info.groups[g][1]
        assert (slots[0] - starts[g]) % row_len == 0 and b - a <= row_len
    # padding stays within the grouping bound: O(S) memory, never a (B, S, S) tensor
    assert total <= n_tokens * (1 + 1 / PAD_FRACTION) + PAD_TOKENS * (len(cu) - 1)
    flash = attention_info(pos, "flash")
    assert flash.slots is None and torch.equal(flash.cu_seqlens, info.cu_seqlens)
    with pytest.raises(ValueError, match="varlen backend"):
        attention(*_qkv(3, 200, 2, 2, 8, 0)[:3], flash, "sdpa")


def test_model_loss_and_gradients_unchanged(monkeypatch):
    """A GQA model on packed rows: loss and every parameter gradient equal the dense-mask path's."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=128)
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 77))
    pos = packed_positions(2, 77, [20, 3, 41, 9], crossing=True)

    def run():
        model.zero_grad()
        loss = model(ids, position_ids=pos, labels=ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = run()
    monkeypatch.setattr(transformer_mod, "attention", lambda q, k, v, info, backend: dense_mask_attention(q, k, v, pos))
    want_loss, want_grads = run()
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)
