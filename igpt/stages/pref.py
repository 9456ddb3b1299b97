"""Comparisons in a preference batch: the segments of each row and the pairs their ranks define.

A kind=pref row holds one record: K >= 2 sequences (prompt + response) back to back, each a segment whose
``position_ids`` restart at 0, with ``seq_rank`` the rank of its response (0 = best) on every token and -1 on padding
(igpt/data/packing.py). InstructGPT trains its reward model on all C(K, 2) comparisons of a prompt as *one* batch
element (Ouyang et al. 2022, section 3.5: the comparisons of one prompt are strongly correlated, and treating them as
separate examples overfits), so every pair of a record carries weight ``1 / (its record's untied pairs)``: a record
counts once, a chosen/rejected pair being the case K = 2. Ties give no pair, and a record with ties spreads its weight
over the pairs it has (ranking [0, 0, 1]: two pairs of 1/2 each, not of 1/C(3, 2) = 1/3), so every record weighs the
same in the loss, which is the mean over records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Comparisons:
    """Segments and ranked pairs of a batch ``(B, S)``; ``n`` segments and ``m`` pairs."""

    row: torch.Tensor  # (n,) row (= record) of each segment
    end: torch.Tensor  # (n,) input position of each segment's last token
    index: torch.Tensor  # (n,) position of the segment in its row (0..K-1): the response's index in its record
    segment_of: torch.Tensor  # (B, S) segment id of every token, -1 on padding
    better: torch.Tensor  # (m,) segment id of the preferred response of each pair
    worse: torch.Tensor  # (m,) segment id of the other one
    weight: torch.Tensor  # (m,) 1 / (pairs of the pair's record)
    margin: torch.Tensor  # (m,) the record's margin
    records: int  # rows with at least one pair: the loss's count
    rank: torch.Tensor  # (n,) the rank of each segment's response (0 = best)
    best_weight: torch.Tensor  # (n,) 1 / (best-ranked responses of its record) on those, 0 elsewhere and without pairs

    @property
    def n(self) -> int:
        return int(self.row.numel())

    def per_segment(self, per_token: torch.Tensor) -> torch.Tensor:
        """Sum a ``(B, S)`` per-token quantity over each segment: ``(n,)``."""
        keep = self.segment_of >= 0
        out = torch.zeros(self.n, dtype=per_token.dtype, device=per_token.device)
        return out.index_add(0, self.segment_of[keep], per_token[keep])

    def at_end(self, per_token: torch.Tensor) -> torch.Tensor:
        """A ``(B, S)`` per-position quantity read at each segment's last token: ``(n,)``."""
        return per_token[self.row, self.end]

    def weighted_sum(self, per_pair: torch.Tensor) -> torch.Tensor:
        """Sum over pairs with the record weights: each record contributes the mean over its pairs."""
        return (per_pair * self.weight).sum()


def comparisons(batch: dict[str, torch.Tensor]) -> Comparisons:
    """The segments and pairs of a kind=pref (micro-)batch, on the batch's device."""
    pos, rank = batch["position_ids"], batch["seq_rank"]
    b, s = pos.shape
    device = pos.device
    starts = (pos == 0) & (rank >= 0)  # (B, S) first token of every real segment
    seg_in_row = torch.cumsum(pos == 0, dim=1) - 1  # (B, S) segment counter along the row (padding included)
    flat = torch.nonzero(starts)  # (n, 2) rows and start columns, row-major
    row, col = flat[:, 0], flat[:, 1]
    n = row.numel()
    # segment ids: the k-th start overall; a token's id comes from its (row, counter) pair
    lookup = torch.full((b, s), -1, dtype=torch.long, device=device)
    lookup[row, seg_in_row[row, col]] = torch.arange(n, device=device)
    segment_of = torch.where(rank >= 0, lookup.gather(1, seg_in_row.clamp(min=0)), torch.full_like(pos, -1))
    cols = torch.arange(s, device=device).expand(b, s)
    end = torch.zeros(n, dtype=torch.long, device=device)
    keep = segment_of >= 0
    end = end.scatter_reduce(0, segment_of[keep], cols[keep], reduce="amax", include_self=False)
    first = torch.zeros(b, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, row, torch.arange(n, device=device), reduce="amin", include_self=False)
    index = torch.arange(n, device=device) - first[row]
    seg_rank = rank[row, col]
    # pairs: same row, strictly better rank (lower number) first
    same = row[:, None] == row[None, :]  # (n, n)
    better_than = seg_rank[:, None] < seg_rank[None, :]
    better, worse = torch.nonzero(same & better_than, as_tuple=True)
    pairs_per_row = torch.zeros(b, dtype=torch.float32, device=device).index_add(
        0, row[better], torch.ones(better.numel(), device=device)
    )
    weight = 1.0 / pairs_per_row[row[better]]
    margin = batch["margin"][row[better], 0].float() if "margin" in batch else torch.zeros_like(weight)
    # the best response(s) of each record with a comparison: where an SFT term (RPO's NLL, ORPO) trains
    top = torch.full((b,), 2**30, dtype=seg_rank.dtype, device=device).scatter_reduce(
        0, row, seg_rank, reduce="amin", include_self=True)
    best = (seg_rank == top[row]) & (pairs_per_row[row] > 0)
    n_best = torch.zeros(b, dtype=torch.float32, device=device).index_add(0, row, best.float())
    best_weight = torch.where(best, 1.0 / n_best[row].clamp(min=1), torch.zeros_like(n_best[row]))
    return Comparisons(
        row=row, end=end, index=index, segment_of=segment_of, better=better, worse=worse, weight=weight,
        margin=margin, records=int((pairs_per_row > 0).sum()), rank=seg_rank, best_weight=best_weight,
    )


def count_records(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Records with at least one comparison (two segments of different rank) per batch: the loss's count."""
    rank = batch["seq_rank"]
    lo = torch.where(rank >= 0, rank, torch.full_like(rank, 2**30)).min(dim=1).values
    hi = rank.max(dim=1).values
    return ((rank >= 0).any(dim=1) & (hi > lo)).sum()
