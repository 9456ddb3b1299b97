"""The prepared data kinds and the sample fields each stores: the one place that lists them.

Each sample of a WebDataset shard written by ``igpt.data.prepare`` holds these members (raw little-endian arrays;
token fields in the index's dtype, ``*mask.bin`` uint8; docs/internals.md, "Prepared data"):

- ``text``: ``ids.bin``, one document (or chunk) starting with the tokenizer's document start (``<|endoftext|>``).
- ``sft``: ``ids.bin`` and ``mask.bin`` (1 on the assistant tokens the loss covers).
- ``pref``: ``ids.bin`` and ``mask.bin`` of K >= 2 complete sequences (prompt + response) back to back, mask 1 on
  each response; ``lens.bin`` (uint32, K sequence lengths), ``rank.bin`` (int32, K ranks: 0 = best, equal ranks tie)
  and ``margin.bin`` (float32, one value: the Bradley-Terry margin of a chosen/rejected pair; 0 for rankings).
- ``kto``: unpaired examples for KTO, stored like a ``pref`` record with K = 1: one sequence (prompt + completion),
  ``rank.bin`` 0 for a desirable completion (``"label": true``) and 1 for an undesirable one, ``margin.bin`` 0.
- ``prompt``: ``ids.bin`` (the prompt with the generation prompt, ready to sample from) and ``record.json`` (the
  source record, whose fields other than the prompt go to reward functions).
"""

from __future__ import annotations

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("ids.bin",),
    "sft": ("ids.bin", "mask.bin"),
    "pref": ("ids.bin", "mask.bin", "lens.bin", "rank.bin", "margin.bin"),
    "kto": ("ids.bin", "mask.bin", "lens.bin", "rank.bin", "margin.bin"),
    "prompt": ("ids.bin", "record.json"),
}
KINDS: tuple[str, ...] = tuple(KIND_FIELDS)
# Fields that are not token ids, with their dtypes (token fields use the index's dtype: uint16 or uint32).
OTHER_FIELDS: dict[str, str] = {
    "mask.bin": "u1", "lens.bin": "<u4", "rank.bin": "<i4", "margin.bin": "<f4", "record.json": "u1",
}
