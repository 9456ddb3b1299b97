"""Reading one JSON object from a file, with the file named in the error (tokenizer, chat and model configs)."""

from __future__ import annotations

import json
from typing import Any


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file when it is unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out
