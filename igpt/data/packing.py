"""Turn one partition's sample stream into rows of ``seq_len + 1`` tokens, and rows into batch arrays.

A row of ``S + 1`` tokens gives ``input_ids = row[:-1]`` and ``labels = row[1:]`` (``-100`` where there is no loss).
``position_ids`` restart at 0 at every row start and every document start, so attention can stay inside a document
(doc id = ``cumsum(position_ids == 0)``; docs/internals.md, "Batches"). Padding after the last document of a row is a
segment of its own (its positions restart at 0 too), so no real token ever shares a segment with padding.

- ``TextPacker`` (kind=text, pack=True): the partition's documents, each starting with ``<|endoftext|>``, are one
  token stream, cut into rows that overlap by ONE token: row k = ``stream[k*S : k*S + S + 1]``. Every token after the
  first is a target exactly once, including the ``<|endoftext|>`` that follows a document (a legitimate prediction).
  This is nanoGPT's ``x = data[i:i+S], y = data[i+1:i+S+1]`` made into a non-overlapping-target sequence. Document
  starts come from the sample boundaries, not from token values, so a stray special token cannot split a document.
- ``ConvPacker`` (kind=sft, or kind=text with pack=False): whole conversations packed greedily, in order, into rows
  (a new row starts when the next one does not fit; a conversation longer than ``S + 1`` is truncated), the rest
  padded with ``<|pad|>``; labels only where the loss mask of the target token is 1 and never across a document start.
  With ``pack=False`` each conversation gets its own row.
- ``PrefPacker`` (kind=pref): one preference record per row: its K >= 2 sequences (prompt + response each) back to
  back as K segments of at most ``S`` tokens in all, so that the last token of every segment is an input position
  (a reward model reads its value there). ``seq_rank`` gives each token the rank of its segment (-1 on padding),
  ``margin`` the record's margin (float32 bits), ``sample_id`` the record's global index in the split. A record
  longer than ``S`` keeps its prompts and cuts the longest responses first; if the prompts alone do not fit, their
  starts are cut too.
- ``PromptPacker`` (kind=prompt): one prompt per row, right-padded (``prompt_len`` and ``sample_id`` per row); a
  prompt longer than ``S`` keeps its last ``S`` tokens.

Each packer's ``state()`` is the position of the next row's first token: ``{"epoch", "unit", "sample", "offset",
"done"}`` (see ``igpt.data.partition``); a packer built from a state continues exactly there.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from igpt.data.partition import Location, SampleCursor

IGNORE_INDEX = -100


class Packer(Protocol):
    cursor: SampleCursor

    def rows(self, n: int) -> dict[str, np.ndarray]: ...

    def exhausted(self) -> bool: ...

    def state(self) -> dict: ...


def position_ids_from_starts(start: np.ndarray) -> np.ndarray:
    """(n, S) bool document starts -> (n, S) int64 positions restarting at 0 at each start and at each row start."""
    n, S = start.shape
    idx = np.arange(S, dtype=np.int64)
    last = np.where(start, idx, 0)  # (n, S): index of the start at that position, 0 elsewhere
    np.maximum.accumulate(last, axis=1, out=last)  # row start counts as a start: index 0 is the floor
    return idx - last


def to_batch(tokens: np.ndarray, target: np.ndarray, start: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    """Rows (n, S+1) tokens, (n, S) target flags, (n, S) start flags -> the batch arrays of docs/internals.md."""
    return {
        f"{prefix}input_ids": tokens[:, :-1],
        f"{prefix}labels": np.where(target, tokens[:, 1:], IGNORE_INDEX),
        f"{prefix}position_ids": position_ids_from_starts(start),
    }


def _state(loc: Location, offset: int, done: bool) -> dict:
    return {"epoch": int(loc[0]), "unit": int(loc[1]), "sample": int(loc[2]), "offset": int(offset), "done": done}


class TextPacker:
    """Rows of a continuous document stream with one token of overlap (module docstring)."""

    def __init__(
        self,
        cursor: SampleCursor,
        seq_len: int,
        pad_id: int,
        *,
        offset: int = 0,
        done: bool = False,
        chunk_tokens: int = 1 << 16,
    ) -> None:
        self.cursor = cursor
        self.S = seq_len
        self.pad_id = pad_id
        self.chunk_tokens = chunk_tokens
        self._first_offset = offset  # the first sample read continues at this token
        self._done = done  # no target token is left (only with loop=False)
        self._end = done  # the cursor has nothing more
        self._buf = np.empty(0, dtype=cursor.layout.index.dtype)
        self._starts = np.empty(0, dtype=np.int64)  # start of each buffered sample in _buf (< 0: began earlier)
        self._locs: list[Location] = []
        self._flags = np.empty(0, dtype=bool)  # _buf[i] opens a document
        self._pos = 0

    def _refill(self, need: int) -> None:
        have = len(self._buf) - self._pos
        if have >= need or self._end:
            return
        pos = self._pos
        if self._locs:
            j = int(np.searchsorted(self._starts, pos, side="right")) - 1
            starts, locs = list(self._starts[j:] - pos), self._locs[j:]
        else:
            starts, locs = [], []
        pieces = [self._buf[pos:]]
        total = have
        target = max(need, min(4 * need, self.chunk_tokens))  # read ahead a little, never many tiny epochs
        while total < target:
            got = self.cursor.next()
            if got is None:
                self._end = True
                break
            loc, (ids,) = got
            start = total - self._first_offset
            if self._first_offset:
                ids, self._first_offset = ids[self._first_offset :], 0
            pieces.append(ids)
            starts.append(start)
            locs.append(loc)
            total += len(ids)
        self._buf = np.concatenate(pieces)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._locs = locs
        self._pos = 0
        flags = np.zeros(len(self._buf) + 1, dtype=bool)  # +1: an empty last sample starts at len(_buf)
        flags[self._starts[self._starts >= 0]] = True
        self._flags = flags[:-1]

    def exhausted(self) -> bool:
        if not self._done:
            self._refill(2)
            self._done = len(self._buf) - self._pos < 2
        return self._done

    def rows(self, n: int) -> dict[str, np.ndarray]:
        S = self.S
        tokens = np.full((n, S + 1), self.pad_id, dtype=np.int64)
        target = np.zeros((n, S), dtype=bool)
        start = np.zeros((n, S), dtype=bool)
        if not self._done:
            self._refill(n * S + 1)
            avail = len(self._buf) - self._pos
            full = min(n, (avail - 1) // S) if avail > 0 else 0  # rows with all S + 1 tokens
            if full:
                idx = self._pos + np.arange(full)[:, None] * S + np.arange(S + 1)  # (full, S+1) buffer indices
                tokens[:full] = self._buf[idx]
                start[:full] = self._flags[idx[:, :S]]
                target[:full] = True
                self._pos += full * S
            if full < n:  # the stream ended (loop=False): one partial row with what is left, then padding rows
                rem = len(self._buf) - self._pos
                if rem >= 2:
                    tokens[full, :rem] = self._buf[self._pos :]
                    start[full, :rem] = self._flags[self._pos :]
                    target[full, : rem - 1] = True
                    if rem < S:
                        start[full, rem] = True  # the padding is a segment of its own
                    self._pos = len(self._buf) - 1
                self._done = True
        return to_batch(tokens, target, start)

    def state(self) -> dict:
        if self._done:
            return _state(self.cursor.position, 0, True)
        if not self._locs:  # nothing read yet: still where we started
            return _state(self.cursor.position, self._first_offset, False)
        j = int(np.searchsorted(self._starts, self._pos, side="right")) - 1
        return _state(self._locs[j], self._pos - int(self._starts[j]), False)


def _place(tokens: np.ndarray, mask: np.ndarray, start: np.ndarray, r: int, fill: int, arrays: tuple) -> int:
    """Copy one document (ids, optional loss mask) into row r at ``fill``, truncated to the row; return the new fill."""
    ids = arrays[0]
    take = min(len(ids), tokens.shape[1] - fill)
    tokens[r, fill : fill + take] = ids[:take]
    mask[r, fill : fill + take] = arrays[1][:take] if len(arrays) > 1 else 1
    start[r, fill] = True
    return fill + take


def _conv_batch(tokens: np.ndarray, mask: np.ndarray, start: np.ndarray, fills: list[int], prefix: str = "") -> dict:
    S = tokens.shape[1] - 1
    for r, fill in enumerate(fills):
        if fill <= S:
            start[r, fill] = True  # the padding is a segment of its own
    # A target is a token under the loss mask that does not open a document (no prediction across documents).
    target = (mask[:, 1:] != 0) & ~start[:, 1:]
    return to_batch(tokens, target, start[:, :S], prefix)


class ConvPacker:
    """Whole conversations (or documents) per row, greedily packed when ``pack`` (module docstring)."""

    def __init__(self, cursor: SampleCursor, seq_len: int, pad_id: int, *, pack: bool, done: bool = False) -> None:
        self.cursor = cursor
        self.S = seq_len
        self.pad_id = pad_id
        self.pack = pack
        self._pending: tuple[Location, tuple] | None = None
        self._done = done

    def _peek(self) -> tuple[Location, tuple] | None:
        while self._pending is None and not self._done:
            self._pending = self.cursor.next()
            if self._pending is None:
                self._done = True
            elif len(self._pending[1][0]) == 0:
                self._pending = None  # an empty document contributes nothing
        return self._pending

    def exhausted(self) -> bool:
        return self._peek() is None

    def take(self) -> tuple[Location, tuple] | None:
        """The next sample (None when done), consumed."""
        item, self._pending = self._peek(), None
        return item

    def rows(self, n: int) -> dict[str, np.ndarray]:
        S = self.S
        tokens = np.full((n, S + 1), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, S + 1), dtype=np.uint8)
        start = np.zeros((n, S + 1), dtype=bool)
        fills = [0] * n
        for r in range(n):
            fill = 0
            while (item := self._peek()) is not None:
                if fill and (not self.pack or fill + len(item[1][0]) > S + 1):
                    break
                fill = _place(tokens, mask, start, r, fill, item[1])
                self._pending = None
                if not self.pack:
                    break
            fills[r] = fill
        return _conv_batch(tokens, mask, start, fills)

    def state(self) -> dict:
        if self._peek() is None:
            return _state(self.cursor.position, 0, True)
        assert self._pending is not None
        return _state(self._pending[0], 0, False)


def float_bits(x: float) -> int:
    """A float32 carried in an int32 batch channel (``igpt.data.loader`` turns ``margin`` back into floats)."""
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


def fit_segments(lens: np.ndarray, prompt_lens: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """How many tokens of each segment to keep (from the end of its prompt part cut, ``keep_prompt``, and from the
    start of its response part, ``keep_resp``) so that all of them fit ``capacity`` tokens.

    Responses are cut longest first (one common cap, water-filling) while every segment keeps its whole prompt and at
    least one response token; only when that cannot fit are the prompts cut from the left to the same length.
    """
    resp = lens - prompt_lens
    if lens.sum() <= capacity:
        return prompt_lens.copy(), resp.copy()
    k = len(lens)
    if prompt_lens.sum() + np.minimum(resp, 1).sum() <= capacity:
        lo, hi = 1, int(resp.max())  # the largest cap c with sum(prompt + min(resp, c)) <= capacity
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_lens.sum() + np.minimum(resp, mid).sum() <= capacity:
                lo = mid
            else:
                hi = mid - 1
        return prompt_lens.copy(), np.minimum(resp, lo)
    q = capacity // k - 1
    if q < 0:
        raise ValueError(f"a preference record with {k} responses cannot fit trainer.seq_len={capacity} tokens")
    return np.minimum(prompt_lens, q), np.minimum(resp, 1)


class PrefPacker:
    """One preference record (K ranked sequences) per row (module docstring)."""

    def __init__(self, cursor: SampleCursor, seq_len: int, pad_id: int, *, done: bool = False) -> None:
        self._conv = ConvPacker(cursor, seq_len, pad_id, pack=False, done=done)
        self.cursor = cursor
        self.S = seq_len
        self.pad_id = pad_id
        self.truncated = 0  # records cut to fit seq_len

    def exhausted(self) -> bool:
        return self._conv.exhausted()

    def rows(self, n: int) -> dict[str, np.ndarray]:
        S = self.S
        tokens = np.full((n, S + 1), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, S + 1), dtype=np.uint8)
        start = np.zeros((n, S + 1), dtype=bool)
        rank = np.full((n, S + 1), -1, dtype=np.int64)
        margin = np.zeros((n, S), dtype=np.int64)
        sample_id = np.full((n, S), -1, dtype=np.int64)
        fills = [0] * n
        for r in range(n):
            if self._conv.exhausted():
                continue
            sid = self.cursor.last_id  # exhausted() has read the record (it is pending): this is its id
            item = self._conv.take()
            assert item is not None
            ids, msk, lens, ranks, marg = item[1]
            bounds = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            prompt_lens = np.array(
                [int(np.argmax(msk[a:b])) if msk[a:b].any() else b - a for a, b in zip(bounds[:-1], bounds[1:])]
            )
            keep_p, keep_r = fit_segments(np.asarray(lens, dtype=np.int64), prompt_lens, S)
            self.truncated += int((keep_p < prompt_lens).any() or (keep_r < lens - prompt_lens).any())
            fill = 0
            for j, a in enumerate(bounds[:-1]):
                p0 = a + prompt_lens[j] - keep_p[j]
                seg = np.r_[p0 : a + prompt_lens[j], a + prompt_lens[j] : a + prompt_lens[j] + keep_r[j]]
                end = fill + len(seg)
                tokens[r, fill:end], mask[r, fill:end], rank[r, fill:end] = ids[seg], msk[seg], ranks[j]
                start[r, fill] = True
                fill = end
            fills[r] = fill
            margin[r] = float_bits(float(marg[0]) if len(marg) else 0.0)
            sample_id[r] = sid
        out = _conv_batch(tokens, mask, start, fills)
        out["seq_rank"] = rank[:, :S]
        out["margin"] = margin
        out["sample_id"] = sample_id
        return out

    def state(self) -> dict:
        return self._conv.state()


class PromptPacker:
    """One prompt per row, right-padded (module docstring)."""

    def __init__(self, cursor: SampleCursor, seq_len: int, pad_id: int, *, done: bool = False) -> None:
        self._conv = ConvPacker(cursor, seq_len, pad_id, pack=False, done=done)
        self.cursor = cursor
        self.S = seq_len
        self.pad_id = pad_id

    def exhausted(self) -> bool:
        return self._conv.exhausted()

    def rows(self, n: int) -> dict[str, np.ndarray]:
        S = self.S
        tokens = np.full((n, S), self.pad_id, dtype=np.int64)
        length = np.zeros((n, S), dtype=np.int64)
        sample_id = np.full((n, S), -1, dtype=np.int64)
        for r in range(n):
            if self._conv.exhausted():
                continue
            sample_id[r] = self.cursor.last_id  # the pending record's id (see PrefPacker.rows)
            item = self._conv.take()
            assert item is not None
            ids = item[1][0][-S:]
            tokens[r, : len(ids)] = ids
            length[r] = len(ids)
        return {"input_ids": tokens, "prompt_len": length, "sample_id": sample_id}

    def state(self) -> dict:
        return self._conv.state()
