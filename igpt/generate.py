"""Text generation with a KV cache: a Python API and the batch-generation CLI.

Decoding follows the usual static-cache recipe (gpt-fast, Hugging Face ``StaticCache``): one prefill pass over the
prompts fills a preallocated cache (``igpt/model/kv_cache.py``), then each step feeds one token per row. Prompts of
different lengths are left-padded; padding is masked out of attention and every row gets its own RoPE positions
(counting its real tokens only), so a prompt decodes the same in a batch as alone.

Sampling: ``temperature=0`` is greedy; otherwise logits are divided by the temperature, filtered by ``top_k`` (keep the
k largest; 0 = off) and ``top_p`` (nucleus sampling, Holtzman et al. 2019: keep the smallest set of tokens whose
probability reaches p; 1 = off), and sampled with a ``torch.Generator`` per row seeded with ``seed + row index``, so a
row's sample does not depend on which other prompts share its batch. A row stops at ``<|im_end|>`` or
``<|endoftext|>``; the stop token is not part of the response.

Checkpoints trained by SFT or a later stage (``meta.json`` "stage" is sft, rm, dpo or ppo) get the chat template
(``igpt.data.chat.encode_chat`` with the generation prompt); pretraining checkpoints continue raw text after the
``<|endoftext|>`` that starts every document.

CLI (DESIGN.md)::

    python -m igpt.generate checkpoint=<dir> prompt="..."                      # prints one response
    python -m igpt.generate checkpoint=<dir> input=<in.jsonl> output=<out.jsonl>
        [max_new_tokens=256] [temperature=0.8] [top_k=50] [top_p=1.0] [seed=0] [device=auto] [chat=auto]
        [system="..."] [batch_size=8]

Each input line is ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}, ...]}``; it is written back with
``"response"`` added.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from igpt.config import ModelConfig
from igpt.model import KVCache, Transformer

log = logging.getLogger("igpt")

EOT = "<|endoftext|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
STOP_TOKENS = (IM_END, EOT)
CHAT_STAGES = ("sft", "rm", "dpo", "ppo")

Prompt = str | list[dict[str, str]]


# ----------------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[Transformer, Any, dict[str, Any]]:
    """``(model, tokenizer, meta)`` from a checkpoint dir (``meta.json``, ``model.safetensors`` or DCP ``model/``,
    ``tokenizer.json``) or a run dir (its newest complete checkpoint). The model is in eval mode on ``device``."""
    from igpt.checkpoint import load_weights, read_meta, read_model_state, resolve
    from igpt.data.tokenizer import load_tokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint={path}: no such directory")
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise ValueError(f"{os.path.join(ckpt, 'meta.json')}: no 'model' entry (the ModelConfig the weights belong to)")
    cfg = ModelConfig(**meta["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, read_model_state(ckpt), ckpt, assign=True)
    model.to(device).eval()
    return model, load_tokenizer(os.path.join(ckpt, meta.get("tokenizer", "tokenizer.json"))), meta


def is_chat_checkpoint(meta: dict[str, Any]) -> bool:
    """True when the checkpoint was trained with the chat template (SFT or a later stage)."""
    return meta.get("stage") in CHAT_STAGES


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
    positions = (torch.cumsum(real, dim=-1) - 1).clamp(min=0)  # (B, T) per-row RoPE positions of the real tokens
    lengths = real.sum(dim=-1)  # (B,) next position of each row

    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(b)]
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in range(b)]
    step_logits: list[list[torch.Tensor]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    try:
        cache = KVCache.for_model(model, b, t + max_new_tokens)
        logits = model(ids, position_ids=positions, kv_cache=cache, attention_mask=real, logits_to_keep=1)[:, -1]
        for step in range(max_new_tokens):
            logits = logits.float()  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generators)  # (B,)
            is_stop = torch.isin(nxt, stop)
            for i, (tok, st, finished) in enumerate(zip(nxt.tolist(), is_stop.tolist(), done.tolist())):
                if finished:
                    continue
                if return_logits:
                    step_logits[i].append(logits[i].cpu())
                if not st:
                    out[i].append(tok)
                    if stream is not None:
                        stream(i, tok)
            done |= is_stop
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = lengths[:, None].clone()  # (B, 1)
            lengths += 1
            logits = model(nxt[:, None], position_ids=pos, kv_cache=cache)[:, -1]  # (B, V)
    finally:
        model.train(was_training)
    if return_logits:
        return out, [torch.stack(s) if s else torch.empty(0, cfg.vocab_size) for s in step_logits]
    return out


# ----------------------------------------------------------------------------------------------------------- text API
def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of one prompt. A message list always gets the chat template (with the generation prompt); a string
    gets it when ``chat`` (as one user turn after the optional ``system`` turn), else it is raw text after
    ``<|endoftext|>``."""
    from igpt.data.chat import encode_chat, encode_document

    if isinstance(prompt, str) and not chat:
        return encode_document(tokenizer, prompt)  # what pretraining saw: <|endoftext|> then the text

    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
    ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    return [int(i) for i in ids]


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
    template. ``chat=True`` wraps string prompts in the chat template too (use it for SFT and later checkpoints).
    Prompts run ``batch_size`` at a time; row ``i`` samples with seed ``seed + i`` whatever the batching."""
    encoded = [encode_prompt(tokenizer, p, chat, system) for p in prompts]
    stop_ids = [tid for tid in (tokenizer.token_to_id(s) for s in STOP_TOKENS) if tid is not None]
    pad_id = tokenizer.token_to_id(PAD) or 0
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


# ----------------------------------------------------------------------------------------------------------- CLI
def parse_kv_args(argv: Sequence[str], spec: dict[str, tuple[type, Any]], prog: str) -> dict[str, Any]:
    """Parse ``key=value`` arguments against ``spec`` (key -> (type, default; ``...`` = required)).

    Raises ``ValueError`` naming an unknown key (and the accepted ones), a malformed argument, a value of the wrong
    type or a missing required key.
    """
    out: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"{prog}: argument {arg!r} is not key=value")
        key = key.lstrip("+")
        if key not in spec:
            raise ValueError(f"{prog}: unknown key {key!r}; accepted keys: {', '.join(spec)}")
        typ = spec[key][0]
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1", "yes")
            else:
                out[key] = typ(value)
        except ValueError:
            raise ValueError(f"{prog}: {key}={value!r} is not a valid {typ.__name__}") from None
    for key, (_, default) in spec.items():
        if key not in out:
            if default is ...:
                raise ValueError(f"{prog}: {key}=<value> is required")
            out[key] = default
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r}: expected auto, cpu or cuda")
    return device


def resolve_chat(flag: str, meta: dict[str, Any]) -> bool:
    if flag not in ("auto", "true", "false"):
        raise ValueError(f"chat={flag!r}: expected auto, true or false")
    return is_chat_checkpoint(meta) if flag == "auto" else flag == "true"


SAMPLING_SPEC: dict[str, tuple[type, Any]] = {
    "checkpoint": (str, ...),
    "max_new_tokens": (int, 256),
    "temperature": (float, 0.8),
    "top_k": (int, 50),
    "top_p": (float, 1.0),
    "seed": (int, 0),
    "device": (str, "auto"),
    "chat": (str, "auto"),
    "system": (str, None),
}

GENERATE_SPEC: dict[str, tuple[type, Any]] = {
    **SAMPLING_SPEC,
    "prompt": (str, None),
    "input": (str, None),
    "output": (str, None),
    "batch_size": (int, 8),
}


def _read_jsonl(path: str) -> list[tuple[dict[str, Any], Prompt]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                rows.append((obj, obj["prompt"]))
            elif isinstance(obj, dict) and _valid_messages(obj.get("messages")):
                rows.append((obj, obj["messages"]))
            else:
                raise ValueError(
                    f'{path}:{lineno}: expected {{"prompt": "..."}} or '
                    f'{{"messages": [{{"role": "system|user|assistant", "content": "..."}}, ...]}}'
                )
    return rows


def _valid_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) > 0
        and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_kv_args(argv, GENERATE_SPEC, "igpt.generate")
        if (args["prompt"] is None) == (args["input"] is None):
            raise ValueError('igpt.generate: give exactly one of prompt="..." or input=<in.jsonl> output=<out.jsonl>')
        if args["input"] is not None and args["output"] is None:
            raise ValueError("igpt.generate: input=<in.jsonl> needs output=<out.jsonl>")
        device = resolve_device(args["device"])
        rows = _read_jsonl(args["input"]) if args["input"] is not None else None
        model, tokenizer, meta = load_checkpoint(args["checkpoint"], device)
        chat = resolve_chat(args["chat"], meta)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling = {k: args[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "system")}
    if rows is None:
        print(generate(model, tokenizer, [args["prompt"]], chat=chat, **sampling)[0])
        return 0
    responses = generate(model, tokenizer, [p for _, p in rows], chat=chat, batch_size=args["batch_size"], **sampling)
    os.makedirs(os.path.dirname(os.path.abspath(args["output"])), exist_ok=True)
    with open(args["output"], "w", encoding="utf-8") as f:
        for (obj, _), response in zip(rows, responses):
            f.write(json.dumps({**obj, "response": response}, ensure_ascii=False) + "\n")
    log.info("wrote %d responses to %s", len(rows), args["output"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
