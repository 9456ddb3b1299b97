"""Text generation with a KV cache: the library the trainer, the stages and the CLIs use.

Decoding follows the usual static-cache recipe (gpt-fast, Hugging Face ``StaticCache``): one prefill pass over the
prompts fills a preallocated cache (``igpt/model/kv_cache.py``), then each step feeds one token per row. Prompts of
different lengths are left-padded; padding is masked out of attention and every row gets its own RoPE positions
(counting its real tokens only), so a prompt decodes the same in a batch as alone.

Sampling: ``temperature=0`` is greedy; otherwise logits are divided by the temperature, filtered by ``top_k`` (keep the
k largest; 0 = off) and ``top_p`` (nucleus sampling, Holtzman et al. 2019: keep the smallest set of tokens whose
probability reaches p; 1 = off), and sampled with a ``torch.Generator`` per row seeded with ``seed + row index``, so a
row's sample does not depend on which other prompts share its batch. A row stops at a stop id of the tokenizer's
chat format (``igpt.data.chat.ChatFormat.stop_ids``: igpt's ``<|im_end|>`` and ``<|endoftext|>``, or a Hugging Face
tokenizer's end-of-turn tokens); the stop token is not part of the response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from igpt.model import KVCache, Transformer

log = logging.getLogger("igpt")

Prompt = str | list[dict[str, str]]


# ----------------------------------------------------------------------------------------------------------- batching
def positions_from_mask(real: torch.Tensor) -> torch.Tensor:
    """``position_ids`` ``(B, T)`` for rows whose real tokens (``real`` True) are contiguous, with padding on either
    side: real tokens count 0, 1, ...; every padding token is a one-token document of its own (position 0), so the
    model's document masking keeps padding and real tokens apart and a row computes what it would unpadded."""
    return torch.where(real, torch.cumsum(real.long(), dim=-1) - 1, torch.zeros_like(real, dtype=torch.long))


def last_real_index(real: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of each row's last real token (``real`` ``(B, T)`` bool, at least one real token per row)."""
    cols = torch.arange(real.shape[-1], device=real.device).expand_as(real)
    return torch.where(real, cols, torch.full_like(cols, -1)).max(dim=-1).values


# ----------------------------------------------------------------------------------------------------------- sampling
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits ``(B, V)`` outside the top-k / nucleus (top-p) set to -inf; the most likely token always stays."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # the first token has before = 0, so it always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Next token per row ``(B,)`` from logits ``(B, V)``: argmax when ``temperature == 0``, else sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    stream: Callable[[int, int], None] | None = None,
    return_logits: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
    """Generate up to ``max_new_tokens`` after each prompt (lists of token ids); return the new ids per row, without
    the stop token. ``stream(row, token_id)`` is called for every new token as it is chosen (stop tokens excluded).

    Prompts longer than the model's ``max_seq_len - 1`` keep their last tokens (with a warning), and generation stops
    when the cache reaches ``max_seq_len``. ``return_logits`` also returns the logits ``(steps, V)`` each row was
    decoded from (for tests).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_ids needs at least one prompt, and every prompt needs at least one token")
    cfg = model.cfg
    device = next(model.parameters()).device
    limit = cfg.max_seq_len - 1
    if any(len(p) > limit for p in prompts):
        log.warning("prompt longer than max_seq_len - 1 = %d tokens: keeping its last %d tokens", limit, limit)
        prompts = [list(p)[-limit:] for p in prompts]
    b, t = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - t)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    real = torch.zeros(b, t, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at column t - 1
        ids[i, t - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        real[i, t - len(p) :] = True
    ids, real = ids.to(device), real.to(device)
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(b)]
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    step_logits: list[list[torch.Tensor]] = [[] for _ in range(b)]

    def pick(step: int, logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        return sample_next(logits, temperature, top_k, top_p, generators), None

    def collect(logits: torch.Tensor, nxt: torch.Tensor, live: torch.Tensor) -> None:
        for i, (tok, alive) in enumerate(zip(nxt.tolist(), live.tolist())):
            if not alive:
                continue
            if return_logits:
                step_logits[i].append(logits[i].cpu())
            if tok not in stops:
                out[i].append(tok)
                if stream is not None:
                    stream(i, tok)

    was_training = model.training
    model.eval()
    try:
        decode(model, ids, real, max_new_tokens, pick, stop_ids, pad_id, check_every=1, on_step=collect)
    finally:
        model.train(was_training)
    if return_logits:
        return out, [torch.stack(s) if s else torch.empty(0, cfg.vocab_size) for s in step_logits]
    return out


@torch.no_grad()
def decode(
    model: Transformer,
    ids: torch.Tensor,
    real: torch.Tensor,
    max_new_tokens: int,
    pick: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    check_every: int = 1,
    on_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> Rollout:
    """The decoding loop both decoders share: left-padded prompts ``ids`` ``(B, T)`` (``real`` marks real tokens)
    through a static KV cache allocated once, one token per row and step chosen by ``pick(step, logits)`` (the next
    ids ``(B,)`` and, optionally, their log-probs), until every row has emitted a stop token (checked every
    ``check_every`` steps: the only host synchronisation) or ``max_new_tokens``. A row that has stopped keeps
    decoding padding (rows are independent), which the mask leaves out. ``on_step(logits, next, live)`` sees every
    step. Returns the tokens, log-probs (0 without them), mask and ended flags, cut to the longest response."""
    b, t = ids.shape
    device = ids.device
    positions = (torch.cumsum(real.long(), dim=-1) - 1).clamp(min=0)  # (B, T) per-row RoPE positions of real tokens
    lengths = real.sum(dim=-1)  # (B,) next position of each row
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=device)
    mask = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ended = torch.zeros(b, dtype=torch.bool, device=device)
    cache = KVCache.for_model(model, b, t + max_new_tokens)
    logits = model(ids, position_ids=positions, kv_cache=cache, attention_mask=real, logits_to_keep=1)[:, -1]
    for step in range(max_new_tokens):
        logits = logits.float()  # (B, V)
        nxt, logp = pick(step, logits)
        live = ~done
        if on_step is not None:
            on_step(logits, nxt, live)
        tokens[:, step] = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        if logp is not None:
            logprobs[:, step] = torch.where(live, logp, torch.zeros_like(logp))
        mask[:, step] = live
        is_stop = torch.isin(nxt, stop) & live
        ended |= is_stop
        done |= is_stop
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        pos = lengths[:, None].clone()  # (B, 1)
        lengths += 1
        logits = model(tokens[:, step : step + 1], position_ids=pos, kv_cache=cache)[:, -1]  # (B, V)
    n = int(mask.sum(dim=0).nonzero().max()) + 1 if mask.any() else 1
    return Rollout(tokens[:, :n], logprobs[:, :n], mask[:, :n], ended)


# ----------------------------------------------------------------------------------------------------------- rollouts
_M32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)  # odd multipliers < 2**31: every product of a 32-bit value fits int64


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds, in the style of Wellons' lowbias32) on int64 tensors."""
    x = x & _M32
    for c in _MIX:
        x = x ^ (x >> 16)
        x = (x * c) & _M32
    return x ^ (x >> 15)


def row_seeds(seed: int, step: int, rows: torch.Tensor) -> torch.Tensor:
    """A seed per rollout row ``(B,)`` from the run's seed, the step and each row's *global* index ``rows``: the
    sample a row draws does not depend on the world size or on which rows share its batch."""
    base = _hash32(torch.tensor([seed * 1_000_003 + step], dtype=torch.int64))
    return _hash32(rows.to(torch.int64) * 0x9E37 + base)


def gumbel_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``(B, V)`` computed from (row seed, decoding step, token id) by hashing (a counter-based
    generator): deterministic per row, vectorised over the batch, and no generator state to keep or restore."""
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _hash32(_hash32(seeds[:, None] + step * 0x3C6EF372) ^ v[None, :])  # (B, V)
    u = (h.double() + 0.5) / 2.0**32  # in (0, 1)
    return -torch.log(-torch.log(u)).float()


@dataclass
class Rollout:
    """Sampled responses to a batch of prompts (``B`` rows, up to ``N`` new tokens)."""

    tokens: torch.Tensor  # (B, N) sampled ids, pad after the end
    logprobs: torch.Tensor  # (B, N) the sampler's log softmax(logits / T) of each token (0 after the end)
    mask: torch.Tensor  # (B, N) bool: response tokens (the stop token included)
    ended: torch.Tensor  # (B,) bool: stopped at a stop token before the token budget ran out


@torch.no_grad()
def sample_rollout(
    model: Transformer,
    ids: torch.Tensor,
    real: torch.Tensor,
    max_new_tokens: int,
    seeds: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    check_every: int = 8,
) -> Rollout:
    """Sample responses to left-padded prompts ``ids`` ``(B, T)`` (``real`` marks real tokens) on the device.

    The static KV cache is allocated once; sampling is the Gumbel-max trick with :func:`gumbel_noise`, so each row's
    draws depend only on its seed (``row_seeds``); the only host synchronisation is a check, every ``check_every``
    steps, whether every row has stopped. ``temperature=0`` is greedy. ``logprobs`` are under ``softmax(logits / T)``
    before top-k/top-p filtering: the distribution a trainer's forward at the same temperature computes.
    """
    t = ids.shape[1]
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - t)
    if max_new_tokens < 1:
        raise ValueError(f"prompts of {t} tokens leave no room to generate within max_seq_len {model.cfg.max_seq_len}")

    def pick(step: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if temperature <= 0:
            nxt = logits.argmax(dim=-1)
            logp = torch.log_softmax(logits, dim=-1)
        else:
            scaled = logits / temperature
            logp = torch.log_softmax(scaled, dim=-1)
            nxt = (filter_logits(scaled, top_k, top_p) + gumbel_noise(seeds, step, logits.shape[-1])).argmax(dim=-1)
        return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)

    return decode(model, ids, real, max_new_tokens, pick, stop_ids, pad_id, check_every)


# ----------------------------------------------------------------------------------------------------------- text API
def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of one prompt (``igpt.data.chat.ChatFormat.encode_prompt``). A message list always gets the chat
    template (with the generation prompt); a string gets it when ``chat`` (as one user turn after the optional
    ``system`` turn), else it is raw text after the document start (what pretraining saw)."""
    from igpt.data.chat import ChatFormat

    return [int(i) for i in ChatFormat.of(tokenizer).encode_prompt(prompt, chat, system)]


def generate(
    model: Transformer,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    system: str | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Responses (decoded text, special tokens dropped) to ``prompts``: strings, or message lists for the chat
    template. ``tokenizer`` is a ``ChatFormat`` (``igpt.checkpoint.load_model`` returns one) or a plain tokenizer
    with igpt's format. ``chat=True`` wraps string prompts in the chat template too (use it for SFT and later
    checkpoints). Prompts run ``batch_size`` at a time; row ``i`` samples with seed ``seed + i`` whatever the
    batching."""
    from igpt.data.chat import ChatFormat

    fmt = ChatFormat.of(tokenizer)
    encoded = [encode_prompt(fmt, p, chat, system) for p in prompts]
    stop_ids, pad_id = fmt.stop_ids, fmt.pad_id
    responses: list[str] = []
    for start in range(0, len(encoded), batch_size):
        out = generate_ids(
            model,
            encoded[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed + start,
            stop_ids=stop_ids,
            pad_id=pad_id,
        )
        responses += [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
    return responses
