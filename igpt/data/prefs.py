"""Preference and prompt data that needs no hub: built from packaged data, or generated with a known rule.

    python -m igpt.data.prefs chatterbot out=<file.jsonl> [seed=0] [data_dir=<dir>]
    python -m igpt.data.prefs synthetic out=<file.jsonl> [n=2000] [k=2] [seed=0]
    python -m igpt.data.prefs prompts out=<file.jsonl> [n=2000] [seed=0]
    python -m igpt.data.prefs chatterbot_prompts out=<file.jsonl> [data_dir=<dir>]

chatterbot: for every exchange (a user turn and the assistant's reply) of the ``chatterbot-corpus`` conversations
(``igpt.data.corpus.chatterbot_records``) the real reply is *chosen* and the reply of a random exchange from another
topic file is *rejected* (a relevance preference, the kind of pair that negative sampling gives when no labeler
exists). Seeded, so the same call writes the same file.

synthetic: a learnable preference with a known rule, for tests and the CPU demo. A prompt asks about two things
("Of the crown and the sword?"); a response is a short phrase of common words with some *good* words
(kind, fair, noble, ...) and some *bad* ones (cruel, foul, base, ...). A response's score is the number of good words
minus the number of bad ones; ranks follow scores (0 = best, equal scores tie). ``k=2`` writes ``{"prompt",
"chosen", "rejected"}`` pairs (never tied), ``k>2`` K-wise ``{"prompt", "responses", "ranking"}`` records. A model
that learns the rule ranks held-out pairs right; one that does not, half of them.

prompts: ``{"prompt", "target"}`` records for PPO with a programmatic reward: the prompt asks for a good word
("Name a kind word for the crown."); :func:`good_word_reward` scores a completion 1 when it holds a good word and no
bad one, -1 with a bad word, else 0 (``reward.functions=[igpt.data.prefs:good_word_reward]``).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections.abc import Sequence
from typing import Any

from igpt.data.formats import fail, parse_args
from igpt.errors import IgptError

GOOD = ("kind", "fair", "noble", "sweet", "brave", "gentle", "true", "wise")
BAD = ("cruel", "foul", "base", "vile", "false", "rude", "cold", "mean")
NEUTRAL = (
    "the king queen lord lady knight sword crown castle night day heart soul blood war peace old young speak hear see "
    "know come go shall will thee thou thy my our your his her and but or when where how upon within"
).split()
THINGS = ("crown", "sword", "castle", "night", "queen", "knight", "heart", "garden", "river", "battle")


def _write_jsonl(records: Sequence[dict[str, Any]], out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def good_word_reward(prompts: list[Any], completions: list[str], **fields: Any) -> list[float]:
    """A programmatic reward in TRL's batched form: 1 for a completion with a good word and no bad one, -1 for one
    with a bad word, 0 otherwise (repeating good words earns nothing more)."""
    out = []
    for c in completions:
        words = set(re.findall(r"[a-z]+", c.lower()))
        out.append(-1.0 if words & set(BAD) else 1.0 if words & set(GOOD) else 0.0)
    return out


def _response(rng: random.Random, score: int) -> str:
    n_good, n_bad = max(score, 0), max(-score, 0)
    words = rng.choices(NEUTRAL, k=rng.randint(1, 4)) + rng.choices(GOOD, k=n_good) + rng.choices(BAD, k=n_bad)
    rng.shuffle(words)
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def synthetic_records(n: int, k: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` synthetic preference records with ``k`` responses each (module docstring)."""
    if k < 2:
        raise ValueError(f"k={k}: a preference record needs at least 2 responses")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.sample(THINGS, 2)
        prompt = f"Of the {a} and the {b}?"
        scores = [rng.randint(-1, 1) for _ in range(k)]
        while len(set(scores)) < 2:
            scores = [rng.randint(-1, 1) for _ in range(k)]
        responses = [_response(rng, s) for s in scores]
        if k == 2:
            best = 0 if scores[0] > scores[1] else 1
            records.append({"prompt": prompt, "chosen": responses[best], "rejected": responses[1 - best]})
        else:
            order = sorted(set(scores), reverse=True)
            records.append({"prompt": prompt, "responses": responses, "ranking": [order.index(s) for s in scores]})
    return records


def synthetic(out: str, n: int = 2000, k: int = 2, seed: int = 0) -> int:
    """Write ``n`` synthetic preference records to ``out``; return how many."""
    records = synthetic_records(n, k, seed)
    _write_jsonl(records, out)
    return len(records)


def prompt_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": f"Name a kind word for the {rng.choice(THINGS)}.", "target": "good"} for _ in range(n)]


def prompts(out: str, n: int = 2000, seed: int = 0) -> int:
    """Write ``n`` PPO prompt records to ``out``; return how many."""
    records = prompt_records(n, seed)
    _write_jsonl(records, out)
    return len(records)


def chatterbot_exchanges(data_dir: str | None = None) -> list[tuple[str, str, str]]:
    """(topic file, user turn, reply) of every exchange of the chatterbot-corpus conversations."""
    import glob

    import yaml

    from igpt.data.corpus import _default_chatterbot_dir, chatterbot_records

    data_dir = data_dir or _default_chatterbot_dir()
    chatterbot_records(data_dir)  # the same files and checks as the SFT corpus (raises when none are there)
    exchanges: list[tuple[str, str, str]] = []  # (topic file, user turn, reply)
    for path in sorted(glob.glob(os.path.join(data_dir, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv] if isinstance(conv, list) else []
            if any(not t or isinstance(t, (list, dict)) for t in turns):
                continue
            for i in range(0, len(turns) - 1, 2):
                exchanges.append((os.path.basename(path), turns[i], turns[i + 1]))
    return exchanges


def chatterbot_pairs(seed: int = 0, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Relevance pairs from chatterbot-corpus: the real reply chosen, another topic's reply rejected."""
    exchanges = chatterbot_exchanges(data_dir)
    rng = random.Random(seed)
    pairs = []
    for topic, question, reply in exchanges:
        for _ in range(20):
            other = exchanges[rng.randrange(len(exchanges))]
            if other[0] != topic and other[2] != reply:
                pairs.append({"prompt": question, "chosen": reply, "rejected": other[2]})
                break
    return pairs


def chatterbot(out: str, seed: int = 0, data_dir: str | None = None) -> int:
    """Write chatterbot relevance pairs to ``out``; return how many."""
    pairs = chatterbot_pairs(seed, data_dir)
    _write_jsonl(pairs, out)
    return len(pairs)


def chatterbot_prompts(out: str, data_dir: str | None = None) -> int:
    """Write every distinct chatterbot user turn as a PPO prompt record (its first reply as ``reference``)."""
    seen: dict[str, str] = {}
    for _, question, reply in chatterbot_exchanges(data_dir):
        seen.setdefault(question, reply)
    _write_jsonl([{"prompt": q, "reference": r} for q, r in seen.items()], out)
    return len(seen)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "igpt.data.prefs"
    commands = {"chatterbot": chatterbot, "synthetic": synthetic, "prompts": prompts,
                "chatterbot_prompts": chatterbot_prompts}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m {prog} {'|'.join(commands)} out=<file.jsonl> [...]")
    func = commands[argv[0]]
    args = parse_args(argv[1:], func, f"{prog} {argv[0]}", ("out",), __doc__)
    try:
        count = func(**args)
    except (IgptError, ValueError, RuntimeError) as e:
        fail(prog, e)
    print(f"wrote {count} records to {args['out']}")


if __name__ == "__main__":
    main()
