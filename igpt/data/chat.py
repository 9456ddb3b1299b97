"""The chat format of a tokenizer (:class:`ChatFormat`), and igpt's own special tokens and chat template.

A :class:`ChatFormat` is loaded from a ``tokenizer.json`` or from a folder holding one (a Hugging Face model folder,
prepared data, an igpt checkpoint) and is the one place that knows, for that tokenizer: its special ids, the pad id,
the stop ids that end a reply, how a document starts, and how to render and mask a conversation and a generation
prompt (as nanochat keeps special tokens with its tokenizer). It also answers the ``tokenizers.Tokenizer`` API
(``encode``, ``decode``, ``token_to_id``, ...), so code that took a tokenizer takes it unchanged.

**A tokenizer with a chat template** (``chat_template`` in ``tokenizer_config.json``, or ``chat_template.jinja``):
conversations are rendered with the template as transformers' ``apply_chat_template`` renders them (a sandboxed
Jinja environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that
does not escape HTML, the tokenizer's special tokens as variables, ``{% generation %}`` blocks) and the rendered text
is tokenized whole with special-token strings recognised, as transformers tokenizes it. The SFT loss mask covers the
assistant's replies: a template with ``{% generation %}`` markers gives the spans itself, and every token overlapping
one is masked (transformers' ``return_assistant_tokens_mask``); for a template without markers (most published ones)
the spans come from rendering prefixes of the conversation: assistant message ``i`` spans from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``, cut after the first
end-of-turn token in it (so the reply and its end-of-turn are learnt, not the newline a template writes after it).
A template that renders a prefix differently once later messages follow (one that moves the system prompt into the
last user turn, say) is an error asking for ``{% generation %}`` markers. End-of-turn and stop tokens are the
tokenizer's ``eos_token`` and ``generation_config.json``'s ``eos_token_id``.

**A tokenizer without a chat template** (every tokenizer igpt trains) uses igpt's template below, encoded by hand with
message contents as plain text; tokens it needs and a tokenizer lacks are added (``with_chat_tokens``), and a model
initialised from a checkpoint with fewer vocabulary rows is resized (``igpt.checkpoint.WeightsSource.load_into``).

**Documents** start with the tokens the tokenizer's own post-processor puts before a text (its BOS: Llama 3's
``<|begin_of_text|>``, Mistral's ``<s>``); a tokenizer that adds none (igpt's, Qwen2's) starts them with
``<|endoftext|>``, or its ``eos_token``. Pretraining documents, igpt-template conversations and non-chat generation
prompts start that way, and ``igpt.export`` writes a tokenizer whose ``tokenizer(text)`` does the same.

igpt's template is ChatML (OpenAI's ``<|im_start|>``/``<|im_end|>`` turn markers, as used by Qwen and the Hugging Face
chat-template docs) with the role written as a dedicated special token, so a role never depends on how the tokenizer
happens to split the word "assistant". docs/internals.md fixes the contract:

    <document start> then, per message, <|im_start|><|ROLE|>{content}<|im_end|>
    generation prompt: <|im_start|><|assistant|>

The SFT loss mask is 1 exactly on assistant content tokens and the assistant's ``<|im_end|>`` (so the model learns to
stop), 0 on everything else (InstructGPT trains only on the demonstrations, Ouyang et al. 2022). Message contents are
encoded as plain text: a literal ``"<|im_end|>"`` typed by a user becomes ordinary text tokens, never the control
token (the same policy as tiktoken's ``disallowed_special``), so data can't forge turn boundaries. (With a
tokenizer's own template, special-token strings in contents become those tokens, as in transformers.)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

from tokenizers import Tokenizer

from igpt.data.jsonfile import read_json_object

log = logging.getLogger("igpt")

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"

# The order fixes the ids of tokenizers igpt trains (0..6); a tokenizer without a chat template gets those it lacks.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, PAD, IM_START, IM_END, SYSTEM, USER, ASSISTANT)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Message = dict[str, str]


def special_ids(tokenizer: Tokenizer, tokens: tuple[str, ...] = SPECIAL_TOKENS,
                how: str = "add them with tokenizer.add_special_tokens([...]) and save it") -> dict[str, int]:
    """Map each of ``tokens`` (default: every special token of igpt's template) to its id in ``tokenizer``;
    ValueError naming any that are missing and ``how`` to add them."""
    ids = {tok: tokenizer.token_to_id(tok) for tok in tokens}
    missing = [tok for tok, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"tokenizer lacks the special tokens {', '.join(missing)}; igpt's chat template needs all of "
            f"{', '.join(tokens)} ({how})"
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
    if isinstance(tokenizer, ChatFormat):
        tokenizer = tokenizer.tokenizer
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # "<|im_end|>" inside content is text, not the control token
    try:
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which igpt never uses
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = previous


def encode_document(tokenizer: Tokenizer, text: str) -> list[int]:
    """A pretraining document in the tokenizer's chat format: its document start, then the text's tokens."""
    return ChatFormat.of(tokenizer).encode_document(text)


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False, start: str = ENDOFTEXT) -> str:
    """igpt's template as a string (what ``tokenizer.decode(ids, skip_special_tokens=False)`` gives for
    ``encode_chat``'s ids); ``start`` is the document start."""
    messages = validate_messages(messages)
    parts = [start]
    for m in messages:
        parts += [IM_START, ROLE_TOKENS[m["role"]], m["content"], IM_END]
    if add_generation_prompt:
        parts += [IM_START, ASSISTANT]
    return "".join(parts)


def _template_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of igpt's template tokens; ValueError naming any the tokenizer lacks."""
    return special_ids(tokenizer, TEMPLATE_TOKENS, "ChatFormat.with_chat_tokens() adds them")


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    start: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Encode a conversation with igpt's template (``ChatFormat.encode_chat`` uses the tokenizer's own when it has
    one). ``start`` is the document start (default: ``<|endoftext|>``).

    Returns ``(ids, mask)`` of equal length; ``mask`` is 1 on assistant content tokens and on each assistant turn's
    ``<|im_end|>``, 0 elsewhere. With ``add_generation_prompt`` the ids end with ``<|im_start|><|assistant|>``
    (mask 0) so a model continues with the assistant's reply.
    """
    if isinstance(tokenizer, ChatFormat):
        return tokenizer.encode_chat(messages, add_generation_prompt)
    messages = validate_messages(messages)
    sp = _template_ids(tokenizer)
    if start is None:
        start = [special_ids(tokenizer)[ENDOFTEXT]]
    contents = encode_texts(tokenizer, [m["content"] for m in messages])
    ids, mask = list(start), [0] * len(start)
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

    The ids end with the generation prompt; generation should stop at a stop id (``ChatFormat.stop_ids``).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return ChatFormat.of(tokenizer).encode_chat(messages, add_generation_prompt=True)[0]


# ------------------------------------------------------------------------------------------------ templates (Jinja)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("igpt_generation", default=None)


@cache
def _compile(template: str):
    """A chat template compiled in the environment of transformers' ``_cached_compile_jinja_template``."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span of the block's output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation(self, context, caller):
            rv = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


@contextmanager
def _tracking(blocks: list[str], spans: list[tuple[int, int]]):
    token = _TRACKING.set((blocks, spans))
    try:
        yield
    finally:
        _TRACKING.reset(token)


# igpt's template in Jinja, for exported tokenizers (transformers' apply_chat_template gives encode_chat's ids for
# contents without special-token strings); START is replaced by the document start's text.
IGPT_TEMPLATE = (
    "{{ 'START' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('igpt chat roles are system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|><|' + message['role'] + '|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|><|assistant|>' }}{% endif %}"
)

# ------------------------------------------------------------------------------------------------ the chat format
TEMPLATE_TOKENS: tuple[str, ...] = (IM_START, IM_END, SYSTEM, USER, ASSISTANT)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FORMAT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path``, {} when there is no such file."""
    return read_json_object(path) if os.path.exists(path) else {}


class ChatFormat:
    """The chat format of a tokenizer (module docstring): special ids, pad and stop ids, document start, and how a
    conversation renders, tokenizes and is masked. Build it with :meth:`load` (a file or a folder) or :meth:`of`.

    ``template`` is the Jinja chat template, or None for igpt's own format. ``special_tokens`` maps the
    ``tokenizer_config.json`` keys (``bos_token``, ``eos_token``, ``pad_token``, ...) to token strings; ``eos_ids``
    are ``generation_config.json``'s ``eos_token_id`` (the stop ids a model was released with).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_ids: Sequence[int] = (),
        source: str = "tokenizer",
        file: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.file = file  # the tokenizer.json it was read from (copied as is by save), None once changed
        self.template = template
        self.special_tokens = {}
        for key, token in (special_tokens or {}).items():
            if token is not None and tokenizer.token_to_id(token) is None:
                log.warning("%s: %s=%r is not in the tokenizer's vocabulary; ignored", source, key, token)
            elif token is not None:
                self.special_tokens[key] = token
        self.eos_ids = [int(i) for i in eos_ids]
        self.source = source
        self._doc_start = self._find_doc_start()

    # ---- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, tokenizer_file: str = "tokenizer.json") -> ChatFormat:
        """From a ``tokenizer.json`` (the tokenizer alone: igpt's template) or a folder holding one, with the
        folder's ``tokenizer_config.json`` (chat template, special tokens), ``chat_template.jinja`` (which wins over
        the config's template, as in transformers) and ``generation_config.json`` (stop ids)."""
        folder = path if os.path.isdir(path) else None
        file = os.path.join(path, tokenizer_file) if folder else path
        if not os.path.isfile(file):
            from igpt.errors import MissingPathError

            raise MissingPathError(f"tokenizer {file!r} does not exist (expected a tokenizer.json file or a folder)")
        try:
            tok = Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise ValueError(f"{file}: not a Hugging Face tokenizers file ({e})") from None
        if folder is None:
            return cls(tok, source=file, file=file)
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = _read_json(config_path)
        legacy = _read_json(os.path.join(folder, "special_tokens_map.json"))
        special = {k: _token_str(config.get(k, legacy.get(k))) for k in SPECIAL_TOKEN_KEYS}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_path}: chat_template must be a string, got {type(template).__name__}")
        eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
        return cls(tok, template or None, special, eos_ids, source=folder, file=file)

    @classmethod
    def of(cls, tokenizer: Any) -> ChatFormat:
        """``tokenizer`` itself when it is a ChatFormat, else igpt's format over a plain ``tokenizers.Tokenizer``."""
        return tokenizer if isinstance(tokenizer, ChatFormat) else cls(tokenizer)

    def to_args(self) -> tuple:
        """Plain arguments that rebuild this format in another process (:meth:`from_args`)."""
        return self.tokenizer.to_str(), self.template, self.special_tokens, self.eos_ids, self.source

    @classmethod
    def from_args(cls, args: tuple) -> ChatFormat:
        tokenizer_json, *rest = args
        return cls(Tokenizer.from_str(tokenizer_json), *rest)

    def save(self, folder: str) -> list[str]:
        """Write the format's files into ``folder`` (``tokenizer.json``, a byte copy of the file it was read from when
        unchanged; with a template or special tokens also ``tokenizer_config.json`` and ``chat_template.jinja``; with
        stop ids ``generation_config.json``): the names written, which :meth:`load` reads back."""
        import shutil

        os.makedirs(folder, exist_ok=True)
        if self.file is not None:
            shutil.copyfile(self.file, os.path.join(folder, "tokenizer.json"))
        else:
            self.tokenizer.save(os.path.join(folder, "tokenizer.json"))
        written = ["tokenizer.json"]
        if self.template is not None or self.special_tokens:
            config = {**self.special_tokens}
            if self.template is not None:
                config["chat_template"] = self.template
                with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
                    f.write(self.template)
                written.append("chat_template.jinja")
            _write_json(os.path.join(folder, "tokenizer_config.json"), config)
            written.append("tokenizer_config.json")
        if self.eos_ids:
            _write_json(os.path.join(folder, "generation_config.json"), {"eos_token_id": self.eos_ids})
            written.append("generation_config.json")
        return written

    def with_chat_tokens(self) -> ChatFormat:
        """This format with igpt's template tokens added to the tokenizer when it has no template of its own and
        lacks them (new ids after the vocabulary; itself when nothing is missing)."""
        if self.template is not None:
            return self
        missing = [t for t in TEMPLATE_TOKENS if self.tokenizer.token_to_id(t) is None]
        if not self.doc_start_ids() and self.tokenizer.token_to_id(ENDOFTEXT) is None:
            missing.insert(0, ENDOFTEXT)
        if not missing:
            return self
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.add_special_tokens(missing)
        return ChatFormat(tok, None, self.special_tokens, self.eos_ids, self.source)

    # ---- facts ------------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # the tokenizers.Tokenizer API
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    @property
    def has_template(self) -> bool:
        return self.template is not None

    def jinja_template(self) -> str:
        """The template as Jinja text: the tokenizer's own, or igpt's (for export)."""
        if self.template is not None:
            return self.template
        start = self.tokenizer.decode(self.doc_start_ids(), skip_special_tokens=False)
        return IGPT_TEMPLATE.replace("'START'", json.dumps(start).replace('"', "'"))

    def eos_token(self, chat: bool) -> str | None:
        """The token a reply (``chat``) or a document ends with: the tokenizer's ``eos_token`` with its own template;
        with igpt's, ``<|im_end|>`` or ``<|endoftext|>`` (else the ``eos_token``)."""
        if self.template is not None:
            return self.special_tokens.get("eos_token")
        if chat and self.tokenizer.token_to_id(IM_END) is not None:
            return IM_END
        if self.tokenizer.token_to_id(ENDOFTEXT) is not None:
            return ENDOFTEXT
        return self.special_tokens.get("eos_token")

    def token_id(self, key: str) -> int | None:
        """The id of special token ``key`` (``"bos_token"``, ``"eos_token"``, ...), or None."""
        token = self.special_tokens.get(key)
        return None if token is None else self.tokenizer.token_to_id(token)

    def doc_start_ids(self) -> list[int]:
        """The ids a document starts with (module docstring); ``[]`` when the tokenizer has nothing to start with."""
        return list(self._doc_start)

    def _find_doc_start(self) -> list[int]:
        probe = "x"
        bare = self.tokenizer.encode(probe, add_special_tokens=False).ids
        full = self.tokenizer.encode(probe, add_special_tokens=True).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k : k + len(bare)] == bare and k > 0:
                return full[:k]  # the post-processor's prefix (a BOS)
        for candidate in (self.tokenizer.token_to_id(ENDOFTEXT), self.token_id("eos_token")):
            if candidate is not None:
                return [candidate]
        return []

    @property
    def pad_id(self) -> int:
        """The id that fills rows (never a target, never attended to by real tokens)."""
        for candidate in (self.token_id("pad_token"), self.tokenizer.token_to_id(PAD), self.token_id("eos_token")):
            if candidate is not None:
                return candidate
        return 0

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: igpt's ``<|im_end|>`` (own template), ``generation_config.json``'s ``eos_token_id``,
        the tokenizer's ``eos_token``, and ``<|endoftext|>`` (also the end of a document)."""
        candidates = [self.tokenizer.token_to_id(IM_END)] if self.template is None else []
        candidates += [*self.eos_ids, self.token_id("eos_token"), self.tokenizer.token_to_id(ENDOFTEXT)]
        out: list[int] = []
        for i in candidates:
            if i is not None and i not in out:
                out.append(i)
        return out

    @property
    def special_id_set(self) -> set[int]:
        """Ids of special tokens (added tokens marked special, the named ones, igpt's): they stand for no text."""
        added = self.tokenizer.get_added_tokens_decoder()
        ids = {i for i, t in added.items() if t.special}
        ids |= {self.tokenizer.token_to_id(t) for t in (*SPECIAL_TOKENS, *self.special_tokens.values())}
        return {i for i in ids if i is not None}

    # ---- encoding -----------------------------------------------------------------------------------------------
    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: the document start, then ``text``'s tokens (special strings as plain text)."""
        return [*self.doc_start_ids(), *encode_text(self.tokenizer, text)]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text (for igpt's format, what decoding ``encode_chat``'s ids gives)."""
        messages = validate_messages(messages)
        if self.template is None:
            start = self.tokenizer.decode(self.doc_start_ids(), skip_special_tokens=False)
            return render_chat(messages, add_generation_prompt, start)
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[Message], add_generation_prompt: bool, spans: list | None = None) -> str:
        import jinja2

        compiled = _compile(self.template)
        variables = {**self.special_tokens, "messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            if spans is None:
                return compiled.render(**variables)
            blocks: list[str] = []
            with _tracking(blocks, spans):
                for block in compiled.generate(**variables):
                    blocks.append(block)
            return "".join(blocks)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.source}: the chat template failed on this conversation: {e}") from None

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """``(ids, mask)`` of a conversation; mask 1 on the assistant tokens the SFT loss covers (module docstring)."""
        messages = validate_messages(messages)
        if self.template is None:
            return encode_chat(self.tokenizer, messages, add_generation_prompt, self.doc_start_ids())
        spans: list[tuple[int, int]] = []
        text = self._render(messages, add_generation_prompt, spans)
        if not GENERATION_TAG.search(self.template):
            spans = self._assistant_spans(messages, text, add_generation_prompt)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        j = 0
        for t, (start, end) in enumerate(enc.offsets):  # every token overlapping a span (transformers' rule)
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            if j == len(spans):
                break
            if end > spans[j][0]:
                mask[t] = 1
        return list(enc.ids), mask

    def _assistant_spans(
        self, messages: list[Message], text: str, add_generation_prompt: bool
    ) -> list[tuple[int, int]]:
        """Character spans of the assistant replies in ``text`` from rendered prefixes (module docstring)."""
        stops = [s for s in (self.tokenizer.id_to_token(i) for i in self.stop_ids) if s]
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True) if i else ""
            upto = self._render(messages[: i + 1], False)
            if not (text.startswith(before) and text.startswith(upto) and len(upto) >= len(before)):
                raise ValueError(
                    f"{self.source}: the chat template renders the first {i + 1} messages differently once later "
                    f"messages follow, so igpt cannot tell which tokens are the assistant's reply; mark the reply "
                    f"with {{% generation %}} ... {{% endgeneration %}} in the template"
                )
            start, end = len(before), len(upto)
            cut = [text.find(s, start, end) for s in stops]
            cut = [c + len(s) for c, s in zip(cut, stops) if c >= 0]
            spans.append((start, min(cut) if cut else end))
        return spans

    def prompt_length(self, prompt: Sequence[Message], ids: Sequence[int]) -> int:
        """Tokens of ``ids`` (prompt + reply) that belong to ``prompt``: igpt's format counts the prompt's own
        encoding, a template the shared start of ``ids`` and the prompt with its generation prompt."""
        if self.template is None:
            return len(self.encode_chat(prompt)[0])
        mine = self.encode_chat(prompt, add_generation_prompt=True)[0]
        n = 0
        while n < min(len(mine), len(ids)) and mine[n] == ids[n]:
            n += 1
        return n

    def encode_prompt(self, prompt: str | Sequence[Message], chat: bool = True, system: str | None = None) -> list[int]:
        """Ids to generate from: a message list always gets the chat template with the generation prompt; a string
        too when ``chat`` (one user turn after an optional ``system`` turn), else it is a document's start."""
        if isinstance(prompt, str) and not chat:
            return self.encode_document(prompt)
        if isinstance(prompt, str):
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
        else:
            messages = list(prompt)
        return self.encode_chat(messages, add_generation_prompt=True)[0]


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
