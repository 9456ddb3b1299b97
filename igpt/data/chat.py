"""igpt's special tokens and chat template: messages -> token ids and the SFT loss mask.

The template is ChatML (OpenAI's ``<|im_start|>``/``<|im_end|>`` turn markers, as used by Qwen and the Hugging Face
chat-template docs) with the role written as a dedicated special token, so a role never depends on how the tokenizer
happens to split the word "assistant". docs/internals.md fixes the contract:

    <|endoftext|> then, per message, <|im_start|><|ROLE|>{content}<|im_end|>
    generation prompt: <|im_start|><|assistant|>

The SFT loss mask is 1 exactly on assistant content tokens and the assistant's ``<|im_end|>`` (so the model learns to
stop), 0 on everything else (InstructGPT trains only on the demonstrations, Ouyang et al. 2022).

Message contents are encoded as plain text: a literal ``"<|im_end|>"`` typed by a user becomes ordinary text tokens,
never the control token (the same policy as tiktoken's ``disallowed_special``), so data can't forge turn boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"

# The order fixes the ids of tokenizers igpt trains (0..6); a user's tokenizer only needs to contain them.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, PAD, IM_START, IM_END, SYSTEM, USER, ASSISTANT)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Message = dict[str, str]


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Map every special token of igpt's template to its id in ``tokenizer``; ValueError naming any that are missing."""
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    missing = [tok for tok, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"tokenizer lacks the special tokens {', '.join(missing)}; igpt's chat template needs all of "
            f"{', '.join(SPECIAL_TOKENS)} (add them with tokenizer.add_special_tokens([...]) and save it)"
        )
    return ids  # type: ignore[return-value]


def validate_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Check a conversation and return it as a list of ``{"role", "content"}`` dicts.

    ``messages`` must be a non-empty list (or tuple) of dicts, each with ``role`` in system/user/assistant and a string
    ``content``; other keys are ignored. ``where`` prefixes the error (e.g. ``"data.jsonl:12: messages"``).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {_show(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: expected a dict with 'role' and 'content', got {_show(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{where}[{i}]: missing key {key!r} (a message needs 'role' and 'content')")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"{where}[{i}]: role {_show(role)} is not one of {', '.join(map(repr, ROLES))}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}]: content must be a string, got {_show(content)}")
        out.append({"role": role, "content": content})
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with special-token strings treated as plain text and no post-processor tokens."""
    return encode_texts(tokenizer, [text])[0]


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``encode_text`` for many texts at once (one batched call into the Rust tokenizer)."""
    if not texts:
        return []
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # "<|im_end|>" inside content is text, not the control token
    try:
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which igpt never uses
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = previous


def encode_document(tokenizer: Tokenizer, text: str) -> list[int]:
    """A pretraining document: ``<|endoftext|>`` followed by the text's tokens."""
    return [special_ids(tokenizer)[ENDOFTEXT], *encode_text(tokenizer, text)]


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The template as a string (what ``tokenizer.decode(ids, skip_special_tokens=False)`` gives for
    ``encode_chat``'s ids)."""
    messages = validate_messages(messages)
    parts = [ENDOFTEXT]
    for m in messages:
        parts += [IM_START, ROLE_TOKENS[m["role"]], m["content"], IM_END]
    if add_generation_prompt:
        parts += [IM_START, ASSISTANT]
    return "".join(parts)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Encode a conversation with igpt's template.

    Returns ``(ids, mask)`` of equal length; ``mask`` is 1 on assistant content tokens and on each assistant turn's
    ``<|im_end|>``, 0 elsewhere. With ``add_generation_prompt`` the ids end with ``<|im_start|><|assistant|>``
    (mask 0) so a model continues with the assistant's reply.
    """
    messages = validate_messages(messages)
    sp = special_ids(tokenizer)
    contents = encode_texts(tokenizer, [m["content"] for m in messages])
    ids, mask = [sp[ENDOFTEXT]], [0]
    for m, content in zip(messages, contents):
        learn = int(m["role"] == "assistant")
        ids += [sp[IM_START], sp[ROLE_TOKENS[m["role"]]], *content, sp[IM_END]]
        mask += [0, 0, *([learn] * len(content)), learn]
    if add_generation_prompt:
        ids += [sp[IM_START], sp[ASSISTANT]]
        mask += [0, 0]
    return ids, mask


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[Message]) -> list[int]:
    """Ids to feed a chat model for generation: a string is one user turn; a list is a conversation so far.

    The ids end with the generation prompt ``<|im_start|><|assistant|>``; generation should stop at ``<|im_end|>``.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
