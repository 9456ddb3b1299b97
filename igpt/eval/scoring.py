"""Log-likelihood scoring of continuations, batched: the core of ``igpt.eval`` and of the lm-evaluation-harness backend.

A request is ``(context_ids, continuation_ids)``; its score is the sum over the continuation tokens of the model's
log-probability of each token given everything before it. This is lm-evaluation-harness's ``loglikelihood``
(``HFLM._loglikelihood_tokens``): when context + continuation is longer than ``max_seq_len + 1`` tokens, the context is
cut at the left so that the model sees the last ``max_seq_len`` tokens, and the continuation is scored in full (it
must fit: at most ``max_seq_len`` tokens). The model reads the input ``(context + continuation)[-(L + 1):][:-1]`` and
the continuation's log-probs are read from its last ``len(continuation)`` positions.

Batches are right-padded; with causal attention, padding after a row's last token changes nothing before it, so a
request scores the same in any batch (up to float rounding of different matrix shapes). Requests are sorted longest
first (as lm-evaluation-harness does) so that a batch holds rows of similar length, and the results come back in the
caller's order. Log-softmax runs in fp32 on the continuation positions only (never on the full ``(B, S, V)`` logits).

Rolling windows (``rolling_windows``) split a long text into requests that predict each token exactly once with as much
context as fits: lm-evaluation-harness's ``get_rolling_token_windows`` + ``make_disjoint_window`` (context_len 1).

The model is called as ``model(input_ids, position_ids=...)`` -> logits ``(B, S, V)`` only; the functions put it in eval
mode and restore its previous mode, use no global state and no ``torch.distributed`` (every rank may call them with
the same inputs: sharded models then run the same forwards on every rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Request = tuple[Sequence[int], Sequence[int]]


@dataclass
class Score:
    """The score of one request: summed log-prob, number of continuation tokens, how many of them are the argmax."""

    logprob: float
    tokens: int
    greedy_tokens: int

    @property
    def is_greedy(self) -> bool:
        """True when greedy decoding would produce the whole continuation (lm-evaluation-harness's ``is_greedy``)."""
        return self.greedy_tokens == self.tokens


def max_seq_len(model: torch.nn.Module) -> int:
    """The model's context length (``model.cfg.max_seq_len``; also through a DDP-style ``.module`` wrapper)."""
    inner = getattr(model, "module", model)
    cfg = getattr(inner, "cfg", None) or getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__}: expected an igpt Transformer (with .cfg.max_seq_len)")
    return int(cfg.max_seq_len)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; the previous training mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_requests(
    model: torch.nn.Module,
    requests: Sequence[Request],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "scoring",
    length: int | None = None,
) -> list[Score]:
    """Score every ``(context_ids, continuation_ids)`` request (module docstring); results in request order.

    ``length`` overrides the model's ``max_seq_len`` as the window. ValueError when a context is empty (give at least
    ``<|endoftext|>``), a continuation is empty, or a continuation is longer than the window.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    window = length or max_seq_len(model)
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"request {i}: context and continuation need at least one token each")
        if len(cont) > window:
            raise ValueError(f"request {i}: a {len(cont)}-token continuation does not fit max_seq_len={window}")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[Score | None] = [None] * len(requests)
    device = _device(model)
    with eval_mode(model), tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = [(list(requests[i][0]) + list(requests[i][1]))[-(window + 1) :][:-1] for i in chunk]
            conts = [list(requests[i][1]) for i in chunk]
            for i, score in zip(chunk, _score_batch(model, inputs, conts, pad_id, device)):
                out[i] = score
            bar.update(len(chunk))
    return out  # type: ignore[return-value]


def _score_batch(
    model: torch.nn.Module, inputs: list[list[int]], conts: list[list[int]], pad_id: int, device: torch.device
) -> list[Score]:
    b, s = len(inputs), max(len(x) for x in inputs)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    for j, x in enumerate(inputs):  # right padding
        ids[j, : len(x)] = torch.tensor(x, dtype=torch.long)
    positions = torch.arange(s).expand(b, s)  # (B, S): one document per row
    logits = model(ids.to(device), position_ids=positions.to(device))  # (B, S, V)
    # the continuation's tokens are predicted at the last len(cont) input positions of each row
    rows = torch.cat([torch.full((len(c),), j, dtype=torch.long) for j, c in enumerate(conts)])  # (N,)
    cols = torch.cat([torch.arange(len(x) - len(c), len(x)) for x, c in zip(inputs, conts)])  # (N,)
    targets = torch.tensor([t for c in conts for t in c], dtype=torch.long, device=device)  # (N,)
    picked = logits[rows.to(device), cols.to(device)].float()  # (N, V)
    logp = F.log_softmax(picked, dim=-1).gather(-1, targets[:, None])[:, 0]  # (N,)
    greedy = picked.argmax(dim=-1) == targets  # (N,)
    out, start = [], 0
    for c in conts:
        n = len(c)
        out.append(Score(float(logp[start : start + n].double().sum()), n, int(greedy[start : start + n].sum())))
        start += n
    return out


def rolling_windows(tokens: Sequence[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """Requests that predict every token of ``tokens`` once, the first one after ``prefix`` (e.g. ``<|endoftext|>``).

    The first request's context is ``[prefix]`` and it predicts ``tokens[:window]``; each later request predicts the
    next ``window`` tokens (fewer at the end) after as many preceding tokens as fit in the window. Equal to
    lm-evaluation-harness's ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(window, len(tokens))
    out = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, window)
        end = done + n
        ctx = tokens[max(0, end - window - 1) : end - 1]
        out.append((ctx[: len(ctx) - (n - 1)], tokens[end - n : end]))
        done = end
    return out
