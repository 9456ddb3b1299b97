"""Read the records of an offline W&B run file (``run-*.wandb``) for tests.

The file is a LevelDB-style log (W&B's "datastore"): a 7-byte header (``:W&B``, magic 0xBEE1, version), then
32 KiB blocks of records, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST) and a fragment of a
serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
import zlib

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list[wandb_internal_pb2.Record]:
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, f"{path}: not a W&B datastore file"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # the block's tail is zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        fragment = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + fragment) & 0xFFFFFFFF == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        pending = fragment if kind in (FULL, FIRST) else pending + fragment
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records
