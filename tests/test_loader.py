"""Tests of igpt/data/loader.py (with partition.py and packing.py) on small WebDataset shards written by shardutil.

References are built from the raw documents: the partition/unit formula of docs/internals.md and the loader's module
docstrings, greedy packing and position ids computed by plain Python loops.
"""

from __future__ import annotations

import io
import mmap
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from igpt.data.loader import CorruptShardError, ShardLoader
from igpt.data.partition import Layout, SampleCursor, _scan_tar, read_index
from tests.shardutil import EOT, PAD, random_convs, random_docs, random_prefs, write_dataset

S = 16  # seq_len
GB = 16  # global batch size
P = 8  # partitions


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """12 train shards of 10 docs (1..60 tokens) and a 3-shard split (fewer shards than partitions: virtual units)."""
    rng = np.random.default_rng(0)
    shards = [random_docs(rng, 10, 1, 60, 1000) for _ in range(12)]
    tiny = [random_docs(rng, n, 1, 40, 1000) for n in (9, 7, 8)]
    root = write_dataset(str(tmp_path_factory.mktemp("text")), "text", {"train": shards, "tiny": tiny})
    return root, {"train": shards, "tiny": tiny}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    shards = [random_convs(rng, 6, 2, 12, 500) for _ in range(8)]
    shards[2][3] = (np.concatenate([[EOT], rng.integers(7, 500, 30)]), np.ones(31, dtype=np.int64))  # > S + 1
    root = write_dataset(str(tmp_path_factory.mktemp("sft")), "sft", {"train": shards})
    return root, shards


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    rng = np.random.default_rng(2)
    shards = [random_prefs(rng, 5, 2, 5, 500) for _ in range(8)]  # K <= 3 sequences of <= 5 tokens fit S
    root = write_dataset(str(tmp_path_factory.mktemp("pref")), "pref", {"train": shards}, dtype="uint32")
    return root, shards


def make(root, split="train", **kw):
    args = dict(seq_len=S, global_batch_size=GB, num_partitions=P, seed=7)
    args.update(kw)
    return ShardLoader(root, split, **args)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def global_batches(root, W, K, n, state=None, **kw):
    """The first n global batches of a W-rank run with K workers per rank (rank batches concatenated in order),
    each rank first resuming from the merged ``state`` when one is given."""
    per_rank = []
    for r in range(W):
        loader = make(root, rank=r, world_size=W, num_workers=K, **kw)
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append(take(loader, n))
    return [{k: torch.cat([rb[i][k] for rb in per_rank]) for k in per_rank[0][i]} for i in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"batch {i} key {k} differs"


# -------------------------------------------------------------------------------------------------------- references
def brute_positions(ids: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
    """Position ids of one row by a plain loop: 0 at the row start and at each document start (EOT, or `starts`)."""
    out, pos = [], 0
    for i, t in enumerate(ids):
        is_start = (t == EOT) if starts is None else starts[i]
        pos = 0 if i == 0 or is_start else pos + 1
        out.append(pos)
    return np.array(out)


def reference_units(n_shards: int, samples: list[int], p: int) -> list[list[tuple[int, int]]]:
    """shuffle=False: (shard, index) of each sample of each unit partition p reads, in order.

    P <= n_shards: units are the shards p, p+P, ...; fewer shards: unit p alone, holding the samples whose global
    index (shard by shard) is p mod P.
    """
    where = [(s, i) for s in range(n_shards) for i in range(samples[s])]
    if n_shards >= P:
        return [[(u, i) for i in range(samples[u])] for u in range(n_shards)[p::P]]
    return [where[p::P]]


def reference_text_batches(shards, n, R=GB // P):
    """Global batches of an unshuffled, looping text loader, from the raw documents."""
    rows_of = []
    for p in range(P):
        order = [s for unit in reference_units(len(shards), [len(x) for x in shards], p) for s in unit]
        stream = np.concatenate([shards[s][i] for s, i in order])
        need = n * R * S + 1
        stream = np.tile(stream, need // len(stream) + 2)  # epochs repeat in the same order without shuffle
        rows_of.append([stream[k * S : k * S + S + 1] for k in range(n * R)])
    out = []
    for b in range(n):
        rows = [rows_of[p][k] for p in range(P) for k in range(b * R, (b + 1) * R)]
        ids = np.stack([r[:-1] for r in rows])
        out.append(
            {
                "input_ids": torch.from_numpy(ids),
                "labels": torch.from_numpy(np.stack([r[1:] for r in rows])),
                "position_ids": torch.from_numpy(np.stack([brute_positions(r) for r in ids])),
            }
        )
    return out


def stitch_partition_streams(batches, n_parts, R=GB // P):
    """Rebuild each partition's token stream from its rows (one token of overlap); check the padding after its end."""
    streams: list[list[int] | None] = [None] * n_parts
    ended = [False] * n_parts
    targets = 0
    for batch in batches:
        ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        for p in range(n_parts):
            for r in range(p * R, (p + 1) * R):
                valid = labels[r] != -100
                k = int(valid.sum())
                targets += k
                if k == 0:  # a padding row: the partition has run out
                    assert (ids[r] == PAD).all()
                    ended[p] = True
                    continue
                assert not ended[p], "a partition produced tokens after padding"
                assert valid[:k].all(), "targets must be a prefix of the row"
                row = np.concatenate([ids[r][:k], labels[r][k - 1 : k]])
                assert (row[1:] == labels[r][:k]).all()
                if k < S:
                    ended[p] = True
                    assert (ids[r][k + 1 :] == PAD).all()
                if streams[p] is None:
                    streams[p] = list(row)
                else:
                    assert streams[p][-1] == row[0], "consecutive rows must overlap by one token"
                    streams[p] += list(row[1:])
    return streams, targets


def split_docs(stream) -> list[tuple]:
    cuts = [i for i, t in enumerate(stream) if t == EOT] + [len(stream)]
    return [tuple(stream[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


# ------------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("split", ["train", "tiny"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_partitions_cover_each_sample_once_per_epoch(text_data, split, shuffle):
    root, docs = text_data
    index = read_index(root, split)
    layout = Layout(index, P, seed=3, shuffle=shuffle)
    every = sorted(tuple(d) for shard in docs[split] for d in shard)  # a multiset: short documents repeat
    orders = []
    for epoch in range(2):
        seen = []
        for p in range(P):
            cursor = SampleCursor(layout, p, loop=False, skip_corrupt=False, epoch=epoch)
            n_p = 0
            while (got := cursor.next()) is not None:
                seen.append(tuple(got[1][0]))
                n_p += 1
            assert n_p > 0, f"partition {p} got no data"
        assert sorted(seen) == every, "one epoch must read every sample exactly once"
        orders.append(seen)
    assert (orders[0] != orders[1]) == shuffle, "shuffle must reshuffle every epoch, no shuffle must not"
    # both levels reshuffle: which units a partition reads, and the sample order inside a unit
    moved = any(list(layout.units(0, p)) != list(layout.units(1, p)) for p in range(P))
    reordered = any(list(layout.unit_samples(0, u)) != list(layout.unit_samples(1, u)) for u in range(layout.num_units))
    assert moved == shuffle and reordered == shuffle


def test_2x2_reads_every_sample_and_target_once(text_data):
    root, docs = text_data
    all_docs = sorted(tuple(d) for shard in docs["train"] for d in shard)
    got_docs, n_targets, n_tokens = [], 0, 0
    lengths = []
    for rank in range(2):
        loader = make(root, rank=rank, world_size=2, num_workers=2, loop=False)
        batches = list(loader)
        lengths.append(len(batches))
        assert all(b["input_ids"].shape == (GB // 2, S) for b in batches)
        streams, targets = stitch_partition_streams(batches, P // 2)
        for stream in streams:
            assert stream is not None and stream[0] == EOT
            got_docs += split_docs(stream)
            n_tokens += len(stream)
        n_targets += targets
        assert all(s["done"] for s in loader.state_dict()["partitions"].values())
        assert loader.epoch == 0
    assert sorted(got_docs) == all_docs
    assert n_targets == n_tokens - P, "every token but the first of each partition stream is a target exactly once"
    # an evaluation loader's next pass reads the split again from the start
    again = make(root, rank=1, world_size=2, loop=False)
    assert len(list(again)) == lengths[1] and len(list(again)) == lengths[1]


def test_same_seed_same_batches_other_seed_differs(text_data):
    root, _ = text_data
    a, b = take(make(root, seed=11), 8), take(make(root, seed=11), 8)
    assert_same(a, b)
    c = take(make(root, seed=12), 8)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_global_batches_independent_of_ranks_and_workers(text_data):
    root, _ = text_data
    n = 30  # about two epochs of every partition
    ref_loader = make(root)
    ref = take(ref_loader, n)
    assert ref_loader.epoch >= 1, "the test must cross an epoch boundary"
    for W, K in [(1, 2), (2, 1), (2, 2), (4, 4)]:  # 4 x 4: every partition's 2 rows are read by 2 workers
        assert_same(global_batches(root, W, K, n), ref)


@pytest.mark.parametrize("P_, GB_", [(1, 4), (3, 6)])
def test_partitions_shared_by_ranks_give_the_same_batches_and_resume(text_data, P_, GB_):
    """Fewer partitions than readers, or a count that does not divide the world: a partition at the edge of two
    ranks' rows is packed by both, each keeping its own rows; the global batches and the resume are unchanged."""
    root, _ = text_data
    kw = dict(num_partitions=P_, global_batch_size=GB_)
    ref = take(make(root, **kw), 12)
    W = 2
    assert_same(global_batches(root, W, 1, 12, **kw), ref)
    loaders = [make(root, rank=r, world_size=W, **kw) for r in range(W)]
    for ld in loaders:
        take(ld, 5)
    merged = ShardLoader.merge_state_dicts([ld.state_dict() for ld in loaders])
    assert_same(global_batches(root, 1, 1, 7, state=merged, **kw), ref[5:12])
    assert_same(global_batches(root, W, 1, 7, state=merged, **kw), ref[5:12])


def test_auto_partitions():
    from igpt.data.loader import auto_partitions

    assert auto_partitions(32, 10_000) == 8  # the usual case: 8, as before
    assert [auto_partitions(g, 10_000) for g in (4, 12, 6, 7, 1)] == [4, 6, 6, 7, 1]
    assert auto_partitions(32, 5) == 4 and auto_partitions(32, 1) == 1 and auto_partitions(32, 0) == 1


@pytest.mark.parametrize("split", ["train", "tiny"])
def test_packed_rows_match_reference(text_data, split):
    root, docs = text_data
    n = 25
    assert_same(take(make(root, split, shuffle=False), n), reference_text_batches(docs[split], n))


def test_shuffled_rows_are_consistent(text_data):
    root, docs = text_data
    R = GB // P
    batches = take(make(root, seed=5), 20)
    doc_set = {tuple(d) for shard in docs["train"] for d in shard}
    prev_last: dict[int, int] = {}
    streams: dict[int, list] = {p: [] for p in range(P)}
    for batch in batches:
        ids, labels, pos = (batch[k].numpy() for k in ("input_ids", "labels", "position_ids"))
        assert (labels[:, :-1] == ids[:, 1:]).all(), "labels are the inputs shifted by one"
        for r in range(GB):
            assert (pos[r] == brute_positions(ids[r])).all()
            p = r // R
            if p in prev_last:
                assert ids[r, 0] == prev_last[p]
            prev_last[p] = labels[r, -1]
            streams[p] += list(ids[r])
    for stream in streams.values():
        inner = split_docs(stream)[1:-1]  # whole documents between the first and last cut
        assert inner and all(d in doc_set for d in inner)


def test_resume_exact_at_any_point_and_world_size(text_data):
    root, _ = text_data
    n = 40
    loader = make(root)
    batches, states = [], []
    for batch in loader:
        batches.append(batch)
        states.append(loader.state_dict())
        if len(batches) == n:
            break
    # points: inside the first document stream, mid-shard, at/after the end of epoch 0, inside epoch 1
    ends = [next(i for i, s in enumerate(states) if s["partitions"][str(p)]["epoch"] >= 1) for p in range(P)]
    assert any(0 < s["partitions"]["0"]["offset"] for s in states[:3]), "want a point in the middle of a document"
    points = sorted({0, 3, min(ends) - 1, min(ends), max(ends), 30})
    assert max(ends) < 30 < n - 5
    for k in points:
        resumed = make(root)
        resumed.load_state_dict(states[k])
        assert_same(take(resumed, 5), batches[k + 1 : k + 6])
    # a W=1 state resumed at W=2 x K=2, and at W=4 x K=2
    k = min(ends)
    for W, K in [(2, 2), (4, 2)]:
        assert_same(global_batches(root, W, K, 4, state=states[k]), batches[k + 1 : k + 5])


def test_state_of_workers_and_ranks_merges_and_resumes(text_data):
    root, _ = text_data
    ref = take(make(root), 24)
    # 2 ranks x 2 workers, stop after 9 batches: workers have prefetched further, the state must not show it
    loaders = [make(root, rank=r, world_size=2, num_workers=2) for r in range(2)]
    for ld in loaders:
        take(ld, 9)
    merged = ShardLoader.merge_state_dicts([ld.state_dict() for ld in loaders])
    one = make(root)
    take(one, 9)
    assert merged == one.state_dict()
    resumed = make(root)
    resumed.load_state_dict(merged)
    assert_same(take(resumed, 15), ref[9:24])


def test_state_errors(text_data):
    root, _ = text_data
    rank0 = make(root, rank=0, world_size=2)
    take(rank0, 2)
    with pytest.raises(ValueError, match=r"lacks partitions \[4, 5, 6, 7\]"):
        make(root).load_state_dict(rank0.state_dict())
    with pytest.raises(ValueError, match=r"lacks partitions \[4, 5, 6, 7\]"):
        ShardLoader.merge_state_dicts([rank0.state_dict()])
    with pytest.raises(ValueError, match=r"lacks partitions \[4, 5, 6, 7\]"):  # one rank twice is not two ranks
        ShardLoader.merge_state_dicts([rank0.state_dict(), rank0.state_dict()])
    full = make(root)
    take(full, 2)
    for kw, key in [({"seed": 8}, "seed"), ({"seq_len": 8}, "seq_len"), ({"num_partitions": 4}, "num_partitions")]:
        with pytest.raises(ValueError, match=f"saved {key}="):
            make(root, **kw).load_state_dict(full.state_dict())


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"global_batch_size": 12}, r"global_batch_size=12 is not a multiple of num_partitions=8"),
        ({"world_size": 3}, r"global_batch_size=16 cannot be split evenly over world_size=3 x num_workers=1"),
        ({"world_size": 4, "num_workers": 8}, r"world_size=4 x num_workers=8 = 32"),
        ({"rank": 2, "world_size": 2}, r"rank=2 is outside world_size=2"),
    ],
)
def test_bad_partition_combinations(text_data, kw, match):
    with pytest.raises(ValueError, match=match):
        make(text_data[0], **kw)


def test_too_small_split_for_endless_stream(tmp_path):
    rng = np.random.default_rng(3)
    root = write_dataset(str(tmp_path), "text", {"train": [random_docs(rng, 3, 2, 5, 100)]})
    with pytest.raises(
        ValueError, match=r"split 'train' has 3 sample\(s\) in 1 shard\(s\), fewer than num_partitions=8"
    ):
        make(root)
    # one pass is fine: partitions without data are simply done
    batches = list(make(root, loop=False))
    streams, _ = stitch_partition_streams(batches, P)
    assert sum(len(split_docs(s)) for s in streams if s) == 3


def greedy_sft_rows(convs, pack):
    """Plain-loop reference: rows of S+1 tokens with loss mask and document starts."""
    rows, cur = [], []
    for ids, mask in convs:
        if cur and (not pack or sum(len(c[0]) for c in cur) + len(ids) > S + 1):
            rows.append(cur)
            cur = []
        cur.append((ids[: S + 1], mask[: S + 1]))
    rows.append(cur)
    out = []
    for row in rows:
        toks = [int(t) for c in row for t in c[0]]
        mask = [int(m) for c in row for m in c[1]]
        starts = [j == 0 for c in row for j in range(len(c[0]))]
        n = len(toks)
        toks, mask, starts = toks + [PAD] * (S + 1 - n), mask + [0] * (S + 1 - n), starts + [True] + [False] * (S - n)
        ids = np.array(toks[:S])
        labels = np.array([toks[i + 1] if mask[i + 1] and not starts[i + 1] else -100 for i in range(S)])
        out.append((ids, labels, brute_positions(ids, np.array(starts[:S]))))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_sft_rows_match_reference(sft_data, pack):
    root, shards = sft_data
    R = GB // P
    batches = list(make(root, shuffle=False, pack=pack, loop=False))
    n_targets = 0
    for p in range(P):
        convs = [shards[s][i] for unit in reference_units(len(shards), [len(x) for x in shards], p) for s, i in unit]
        want = greedy_sft_rows(convs, pack)
        keys = ("input_ids", "labels", "position_ids")
        got = [tuple(b[k][r].numpy() for k in keys) for b in batches for r in range(p * R, (p + 1) * R)]
        for j, (ids, labels, pos) in enumerate(want):
            assert (got[j][0] == ids).all() and (got[j][1] == labels).all() and (got[j][2] == pos).all(), (p, j)
            n_targets += int((labels != -100).sum())
        for ids, labels, pos in got[len(want) :]:  # padding rows after the partition ran out
            assert (ids == PAD).all() and (labels == -100).all() and (pos == np.arange(S)).all()
    total = sum(int(b["labels"].ne(-100).sum()) for b in batches)
    assert total == n_targets > 0


def reference_pref_row(sample, sid: int):
    """One kind=pref row by plain loops: the K sequences back to back (they fit S here), labels on each response's
    tokens after the first token of its sequence, positions restarting per sequence, the segment's rank per token."""
    ids, mask, lens, ranks, margin = sample
    tokens, labels, pos, rank = [], [], [], []
    start = 0
    for k, n in enumerate(lens):
        for j in range(n):
            tokens.append(int(ids[start + j]))
            pos.append(j)
            rank.append(int(ranks[k]))
            nxt = start + j + 1
            labels.append(int(ids[nxt]) if j + 1 < n and mask[nxt] else -100)
        start += n
    pad = S - len(tokens)
    assert pad >= 0
    tokens += [PAD] * pad
    labels += [-100] * pad
    pos += list(range(pad))
    rank += [-1] * pad
    return {"input_ids": tokens, "labels": labels, "position_ids": pos, "seq_rank": rank,
            "margin": [float(np.float32(margin[0]))] * S, "sample_id": [sid] * S}


def test_pref_rows_one_record_per_row(pref_data):
    root, shards = pref_data
    R = GB // P
    batches = take(make(root, shuffle=False, loop=True), 3)
    first = np.cumsum([0] + [len(x) for x in shards])
    for p in range(P):
        order = [(s, i) for unit in reference_units(len(shards), [len(x) for x in shards], p) for s, i in unit]
        order = (order * 4)[: 3 * R]
        rows = [(b, r) for b in batches for r in range(p * R, (p + 1) * R)]
        for (b, r), (s, i) in zip(rows, order):
            want = reference_pref_row(shards[s][i], int(first[s] + i))
            for key, value in want.items():
                assert b[key][r].tolist() == value, (key, s, i)


def test_pref_records_cut_to_fit_the_row():
    from igpt.data.packing import fit_segments

    lens, prompts = np.array([10, 30, 14]), np.array([6, 6, 6])
    keep_p, keep_r = fit_segments(lens, prompts, 30)  # prompts kept, responses capped at 4 (6+4 + 6+4 + 6+4 = 30)
    assert keep_p.tolist() == [6, 6, 6] and keep_r.tolist() == [4, 4, 4]
    keep_p, keep_r = fit_segments(lens, prompts, 40)  # 22 tokens for responses: cap 10, the two short ones whole
    assert keep_r.tolist() == [4, 10, 8] and (keep_p + keep_r).sum() == 40
    keep_p, keep_r = fit_segments(lens, prompts, 12)  # prompts must be cut too: 3 tokens of prompt + 1 of response
    assert keep_p.tolist() == [3, 3, 3] and keep_r.tolist() == [1, 1, 1]
    assert fit_segments(lens, prompts, 100)[1].tolist() == [4, 24, 8]  # everything fits: nothing cut
    with pytest.raises(ValueError, match="cannot fit"):
        fit_segments(lens, prompts, 2)


@pytest.mark.parametrize("kind, pack", [("sft", True), ("sft", False), ("pref", True)])
def test_resume_exact_for_conversations_and_pairs(sft_data, pref_data, kind, pack):
    root = (sft_data if kind == "sft" else pref_data)[0]
    loader = make(root, pack=pack)
    batches, states = [], []
    for batch in loader:
        batches.append(batch)
        states.append(loader.state_dict())
        if len(batches) == 14:
            break
    assert loader.epoch >= 1
    for k in (0, 4, 9):
        for W in (1, 2):
            assert_same(global_batches(root, W, 0, 4, state=states[k], pack=pack), batches[k + 1 : k + 5])
    # an evaluation pass resumed in the middle yields exactly the rest of the pass
    full = make(root, pack=pack, loop=False)
    everything, mid = [], None
    for batch in full:
        everything.append(batch)
        if len(everything) == 1:
            mid = full.state_dict()
    assert len(everything) >= 2 and mid is not None
    resumed = make(root, pack=pack, loop=False)
    resumed.load_state_dict(mid)
    assert_same(list(resumed), everything[1:])


# ------------------------------------------------------------------------------------------------------ bad shards
@pytest.fixture
def broken_copy(text_data, tmp_path):
    root, docs = text_data
    dst = str(tmp_path / "data")
    shutil.copytree(root, dst)
    return dst, docs


def read_docs(loader):
    streams, _ = stitch_partition_streams(list(loader), P)
    return sorted(d for s in streams if s for d in split_docs(s))


@pytest.mark.parametrize(
    "split, bad, how",
    [("train", 3, "truncate"), ("train", 3, "header"), ("train", 3, "boundary"), ("tiny", 1, "truncate")],
)
def test_corrupt_shard_error_names_it_and_skip_counts_it(broken_copy, split, bad, how):
    root, docs = broken_copy
    name = f"{split}/shard-{bad:06d}.tar"
    path = os.path.join(root, name)
    data = bytearray(open(path, "rb").read())
    n = len(docs[split][bad])
    if how == "truncate":
        data = data[: len(data) // 2 + 100]
        match = f"shard {name} is truncated"
    elif how == "header":
        data[1024 + 3] ^= 0x55  # inside the name of the second member: its checksum no longer matches
        match = f"shard {name}: tar header checksum mismatch"
    else:  # cut after the 4th member, at a block boundary: tar readers see a short but valid-looking archive
        offs = [i for i in range(0, len(data), 512) if data[i + 257 : i + 262] == b"ustar"]
        heads = [o for o in offs if b"PaxHeader" not in data[o : o + 100]]  # TarWriter adds pax headers
        cut = max(o for o in offs if o <= heads[4] and (o == heads[4] or b"PaxHeader" in data[o : o + 100]))
        data = data[:cut] + bytes(1024)
        match = f"shard {name} holds 4 samples but index.json says {n}"
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptShardError, match=match):
        list(make(root, split, loop=False))
    if split == "train":
        with pytest.raises(Exception, match=f"shard-{bad:06d}"):  # raised in a DataLoader worker, re-raised here
            take(make(root, split, num_workers=2), 20)
    loader = make(root, split, loop=False, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match=f"skipping corrupt shard {name}"):
        got = read_docs(loader)
    assert loader.stats["skipped_shards"] == 1 and loader.stats["skipped_shard_names"] == [name]
    assert loader.stats["skip_events"] >= 1
    want = sorted(tuple(d) for s, shard in enumerate(docs[split]) if s != bad for d in shard)
    assert got == want, "skipping drops exactly the corrupt shard's samples"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_scan_matches_tarfile(tmp_path, fmt):
    """The shard reader's tar scan agrees with Python's tarfile on member names, data offsets and sizes."""
    path = str(tmp_path / "x.tar")
    names = ["a.ids.bin", "d" * 90 + "/" + "k" * 60 + ".ids.bin", "b" * 120 + ".mask.bin", "c.ids.bin"]
    if fmt == tarfile.USTAR_FORMAT:
        names[2] = "c" * 90 + ".mask.bin"  # ustar cannot hold a 120-character base name
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 7 * i + 3, 1.5  # a fractional mtime makes pax write a header per member
            tar.addfile(info, io.BytesIO(bytes(range(info.size))))
    with tarfile.open(path) as tar:
        want = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert _scan_tar(mm, "x.tar") == want


def test_out_of_vocab_ids_are_an_error(tmp_path):
    rng = np.random.default_rng(4)
    docs = random_docs(rng, 8, 2, 5, 100)
    docs[5] = np.array([EOT, 150, 3])
    root = write_dataset(str(tmp_path), "text", {"train": [docs]}, vocab_size=100)
    with pytest.raises(CorruptShardError, match=r"shard train/shard-000000.tar: sample '000000_00000005' has token id"):
        list(make(root, loop=False))
