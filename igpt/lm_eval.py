"""lm-evaluation-harness backend: the lm_eval model ``igpt``, running igpt's model and tokenizer directly (no export).

    python -m igpt.lm_eval --model igpt --model_args checkpoint=<run or checkpoint dir>[,batch_size=8] --tasks ...
        [any lm_eval option: --num_fewshot, --limit, --include_path, --output_path, --apply_chat_template, ...]

registers the class with lm_eval's public ``register_model`` and hands the command line to lm_eval's own CLI (lm_eval
0.4 looks models up in its registry only; nothing in the installed package is patched). From Python::

    import lm_eval
    from igpt.lm_eval import IgptLM
    results = lm_eval.simple_evaluate(model=IgptLM(checkpoint="runs/sft", batch_size=16), tasks=["hellaswag"])

(``import igpt.lm_eval`` also makes ``simple_evaluate(model="igpt", model_args="checkpoint=...")`` work.)

The class follows lm_eval's ``TemplateLM`` and mirrors its ``hf`` backend (``HFLM``) request by request, so the two
agree on the exported model (``python -m igpt.export``) to float rounding:

- ``loglikelihood``: ``TemplateLM`` splits context and continuation as HFLM does (trailing spaces of the context move
  into the continuation; ``context + continuation`` is encoded whole); scoring, including the left cut of contexts
  longer than ``max_length``, is ``igpt.eval.scoring.score_requests``, HFLM's ``_loglikelihood_tokens``.
- ``loglikelihood_rolling``: every token of the text is predicted once after a single ``<|endoftext|>`` (the prefix
  token), in windows of ``max_length``: igpt's bits-per-byte convention. HFLM with ``add_bos_token=True`` encodes the
  text with a BOS *and* prepends the prefix token, scoring an extra ``<|endoftext|>`` after ``<|endoftext|>``
  (EleutherAI/lm-evaluation-harness#3333); HFLM with ``add_bos_token=False`` computes what this class computes.
- ``generate_until``: greedy (or sampled, when the task's ``gen_kwargs`` ask for it) KV-cache decoding with
  ``igpt.generate.generate_ids``; contexts are cut at the left to ``max_length - max_gen_toks``; a row stops at
  ``<|endoftext|>`` / ``<|im_end|>``; the text is cut at the first ``until`` string.

Tokenization: special-token strings in the text are special tokens (as a Hugging Face tokenizer treats them, so the
strings of ``--apply_chat_template`` work). igpt starts every document with ``<|endoftext|>``, so
``add_bos_token=True`` (the default) puts it before every context (not twice: a text that starts with it is left
alone), like HFLM with ``add_bos_token=True``; ``prefix_token_id`` is ``<|endoftext|>`` too. Chat checkpoints are
evaluated on raw text unless lm_eval's ``--apply_chat_template`` is given; then igpt's chat template is used.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.model import TemplateLM
except ImportError as _e:  # the optional extra: one line, not a traceback
    _msg = f"igpt.lm_eval needs lm-evaluation-harness, which is not installed ({_e}): pip install 'igpt[eval]'"
    if __name__ == "__main__":
        print(f"igpt.lm_eval: error: {_msg}", file=sys.stderr)
        raise SystemExit(2) from None
    from igpt.errors import MissingExtraError

    raise MissingExtraError(_msg) from None

from igpt.eval.scoring import max_seq_len, rolling_windows, score_requests
from igpt.precision import DTYPES, LONG, dtype_of

log = logging.getLogger("igpt")



class IgptLM(TemplateLM):
    """lm_eval model over an igpt checkpoint (``checkpoint=``) or an in-memory ``model`` + ``tokenizer``.

    Args (all can be given as ``--model_args key=value,...``):
        checkpoint: an igpt checkpoint or run dir (its newest checkpoint), read by ``igpt.generate.load_checkpoint``.
        model, tokenizer: an igpt ``Transformer`` and its ``tokenizers.Tokenizer`` instead of a checkpoint.
        batch_size: requests per forward pass (``auto`` is not supported: it means 8).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default: auto for a checkpoint, the model's own device for
            an in-memory model); dtype: ``float32``, ``bfloat16`` or ``float16`` (default: as loaded, fp32).
        max_length: context window (default: the model's ``max_seq_len``). max_gen_toks: default generation budget.
        add_bos_token: put the document start (``<|endoftext|>``) before every encoded context (default true, module
            docstring).
    """

    backend = "causal"

    def __init__(
        self,
        checkpoint: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        max_batch_size: int | None = None,  # lm_eval passes it to every model; batch sizes here are fixed
        seed: int = 0,
    ) -> None:
        super().__init__()
        from igpt.devices import resolve_device
        from igpt.generate import load_checkpoint

        if dtype is not None:
            dtype_of(dtype, "igpt lm_eval model: dtype", LONG)
        if model is None:
            if checkpoint is None:
                raise ValueError("igpt lm_eval model: give checkpoint=<run or checkpoint dir> or model=, tokenizer=")
            self._device = torch.device(resolve_device(device or "auto"))
            model, tokenizer, _ = load_checkpoint(str(checkpoint), self._device)
        elif tokenizer is None:
            raise ValueError("igpt lm_eval model: model= needs tokenizer= (the tokenizers.Tokenizer it trained with)")
        else:  # an in-memory model stays where it is unless asked; its train/eval mode is restored after each call
            self._device = torch.device(device) if device else next(model.parameters()).device
        model = model.to(self._device)
        self.model = model.to(DTYPES[dtype]) if dtype else model
        self.checkpoint = checkpoint
        if isinstance(batch_size, str) and not batch_size.isdigit():
            log.warning("igpt lm_eval model: batch_size=%s is not supported; using 8", batch_size)
            batch_size = 8
        self._batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else max_seq_len(self.model)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.seed = int(seed)
        from igpt.data.chat import ChatFormat

        self.tokenizer = fmt = ChatFormat.of(tokenizer)  # the chat format's special ids (igpt's: <|endoftext|>, ...)
        start = fmt.doc_start_ids() or [fmt.pad_id]
        self._prefix, self._prefix_text = start[0], fmt.decode(start, skip_special_tokens=False)
        eos = fmt.eos_token(chat=False)
        self._eot = fmt.token_to_id(eos) if eos else self._prefix
        self._stop_ids = fmt.stop_ids
        self._pad = fmt.pad_id

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> IgptLM:
        """As ``LM.create_from_arg_obj``, but ``--model_args`` win over the values lm_eval's CLI adds (its default
        ``batch_size=1``, ``device``) instead of clashing with them."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> IgptLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what lm_eval reads -----------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"igpt:{self.checkpoint or 'model'}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.jinja_template() if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat format as a string; without the generation prompt the last (assistant) turn stays open."""
        from igpt.data.chat import IM_END

        fmt = self.tokenizer
        if add_generation_prompt or not chat_history or chat_history[-1]["role"] != "assistant":
            return fmt.render(chat_history, add_generation_prompt=add_generation_prompt)
        if not fmt.has_template:
            return fmt.render(chat_history)[: -len(IM_END)]
        if len(chat_history) == 1:  # nothing before the reply to render a generation prompt after
            return fmt.render(chat_history)
        return fmt.render(chat_history[:-1], add_generation_prompt=True) + chat_history[-1]["content"]

    # ---- tokens ----------------------------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=False).ids
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
            add = False  # already there (a chat-templated prompt): never twice
        if add:
            ids = [self._prefix, *ids]
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- requests --------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scores = score_requests(
            self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size, self._pad,
            progress=not disable_tqdm, desc="igpt loglikelihood", length=self.max_length,
        )
        out = []
        for (key, _, _), s in zip(requests, scores):
            result = (s.logprob, s.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in rolling_windows(self.tok_encode(text, add_special_tokens=False), self._eot,
                                             self.max_length):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from igpt.sampling import generate_ids

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="igpt generate_until", disable=disable_tqdm) as bar:
            for idx in groups.values():
                kwargs = dict(requests[idx[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                eos = self.tok_decode([self._eot], skip_special_tokens=False)
                if eos not in until:
                    until.append(eos)
                max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                if max_gen >= self.max_length:
                    raise ValueError(f"max_gen_toks={max_gen} must be below the model's max_length {self.max_length}")
                sample = bool(kwargs.get("do_sample", False)) or float(kwargs.get("temperature", 0.0) or 0.0) > 0
                temperature = float(kwargs.get("temperature", 1.0) or 1.0) if sample else 0.0
                # longest first, as HFLM sorts, so a batch holds contexts of similar length
                idx = sorted(idx, key=lambda i: -len(self.tok_encode(requests[i].args[0])))
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start : start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                               for i in chunk]
                    new = generate_ids(
                        self.model, prompts, max_new_tokens=max_gen, temperature=temperature,
                        top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                        seed=self.seed + start, stop_ids=self._stop_ids, pad_id=self._pad,
                    )
                    for i, ids in zip(chunk, new):
                        text = self.tok_decode(ids)
                        for term in until:
                            if term:
                                text = text.split(term)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out


def register() -> None:
    """Register ``IgptLM`` as lm_eval's model ``igpt`` (lm_eval's public ``register_model``); idempotent."""
    import lm_eval.models  # noqa: F401  (lm_eval fills its registry with its own models only while it is empty)
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model("igpt") is IgptLM:
            return
    except (KeyError, ValueError):
        pass
    register_model("igpt")(IgptLM)


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's CLI (``lm-eval run ...``, or its legacy form without ``run``) with the ``igpt`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--device" or a.startswith("--device=") for a in args):
        # lm_eval's own default is cuda:0, which would override igpt's device=auto on a machine without CUDA
        args += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    # run as a script, this file is the module __main__: register the class of the importable igpt.lm_eval instead,
    # so that `import igpt.lm_eval` elsewhere in the process finds the same class under "igpt"
    from igpt.lm_eval import main as _main

    _main()
else:
    register()
