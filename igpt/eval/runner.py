"""Run task files against a model: one function per kind, and ``evaluate`` / ``run_tasks`` over a list of tasks.

How a prompt and an answer become tokens (the conventions of igpt's training data, docs/internals.md):

- chat (``chat=True``, for SFT and later checkpoints): the context is the prompt in the chat template with the
  generation prompt (``igpt.sampling.encode_prompt``), the answer is scored as the assistant's reply. A ``classify``
  label is scored as the *whole* reply, i.e. followed by ``<|im_end|>``; a ``choice`` is scored as lm-evaluation-harness
  scores a continuation, without an end marker.
- raw text (pretraining checkpoints): the context is ``<|endoftext|>`` + prompt and the answer follows after a space
  (lm-evaluation-harness's ``target_delimiter``); trailing white space of the prompt moves into the answer and
  ``prompt + answer`` is tokenized as one string whose first ``len(context)`` tokens are the context (its
  ``_encode_pair``), so an answer is tokenized as it would be in running text.

Special-token strings inside prompts and answers are plain text, as in igpt's data (``igpt.data.chat.encode_text``).
Nothing here uses ``torch.distributed`` or global state: every rank may call ``run_tasks`` with the same arguments, and
sharded models then run the same forward passes everywhere. The model is put in eval mode and its mode restored.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from igpt.data.chat import ChatFormat
from igpt.eval import metrics as M
from igpt.eval.preference import Scorer, pairwise_accuracy, win_rate
from igpt.eval.scoring import eval_mode, max_seq_len, rolling_windows, score_requests
from igpt.eval.tasks import Prompt, Task, read_task, record_labels

log = logging.getLogger("igpt")



# ------------------------------------------------------------------------------------------------------- tokenization
def answer_pair(
    tokenizer: Any, prompt: Prompt, answer: str, chat: bool, system: str | None = None, end_of_answer: bool = False
) -> tuple[list[int], list[int]]:
    """``(context_ids, answer_ids)`` of a prompt and one candidate answer (module docstring)."""
    from igpt.data.chat import encode_text
    from igpt.sampling import encode_prompt

    if chat or not isinstance(prompt, str):
        ctx = encode_prompt(tokenizer, prompt, True, system)
        cont = encode_text(tokenizer, answer)
        if end_of_answer:  # the reply's end of turn (ChatFormat: <|im_end|> in igpt's template)
            fmt = ChatFormat.of(tokenizer)
            cont.append(fmt.token_to_id(fmt.eos_token(chat=True)))
        return ctx, cont
    context, continuation = prompt, " " + answer
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    start = ChatFormat.of(tokenizer).doc_start_ids()  # what training documents start with (<|endoftext|>)
    ctx = [*start, *encode_text(tokenizer, context)]
    whole = [*start, *encode_text(tokenizer, context + continuation)]
    return ctx, whole[len(ctx) :]


def _record_pairs(tokenizer: Any, record: Any, answers: Sequence[str], chat: bool, system: str | None,
                  end_of_answer: bool = False) -> list[tuple[list[int], list[int]]]:
    pairs = [answer_pair(tokenizer, record.prompt, a, chat, system, end_of_answer) for a in answers]
    for a, (_, cont) in zip(answers, pairs):
        if not cont:
            raise ValueError(f"{record.where}: the answer {a!r} has no tokens of its own after the prompt")
    return pairs


def _pad_id(tokenizer: Any) -> int:
    return ChatFormat.of(tokenizer).pad_id


# ------------------------------------------------------------------------------------------------------- kinds
def eval_choice(model: torch.nn.Module, tokenizer: Any, task: Task, chat: bool, batch_size: int,
                system: str | None = None, progress: bool = False) -> dict[str, Any]:
    requests, spans = [], []
    for r in task.records:
        start = len(requests)
        requests += _record_pairs(tokenizer, r, r.fields["choices"], chat, system)
        spans.append((start, len(requests)))
    scores = score_requests(
        model, requests, batch_size, _pad_id(tokenizer), progress, f"{task.name}: scoring choices"
    )
    lls = [[s.logprob for s in scores[a:b]] for a, b in spans]
    answers = [r.fields["answer"] for r in task.records]
    metrics, preds = M.choice_metrics(lls, [r.fields["choices"] for r in task.records], answers)
    samples = [
        {"prompt": r.prompt, "prediction": p, "prediction_norm": pn, "target": a, "correct": p == a, "logprobs": ll}
        for r, (p, pn), a, ll in zip(task.records, preds, answers, lls)
    ]
    return {"metrics": metrics, "samples": samples}


def eval_classify(model: torch.nn.Module, tokenizer: Any, task: Task, chat: bool, batch_size: int,
                  system: str | None = None, progress: bool = False) -> dict[str, Any]:
    requests, spans, label_lists = [], [], []
    for r in task.records:
        labels = record_labels(task, r)
        start = len(requests)
        requests += _record_pairs(tokenizer, r, labels, chat, system, end_of_answer=True)
        spans.append((start, len(requests)))
        label_lists.append(labels)
    scores = score_requests(model, requests, batch_size, _pad_id(tokenizer), progress, f"{task.name}: scoring labels")
    lls = [[s.logprob for s in scores[a:b]] for a, b in spans]
    y_true = [r.fields["label"] for r in task.records]
    y_pred = [labels[max(range(len(ll)), key=lambda i: (ll[i], -i))] for labels, ll in zip(label_lists, lls)]
    log_probs = [M.log_softmax(ll) for ll in lls]
    metrics, per_class = M.classification_metrics(y_true, y_pred, task.labels)
    metrics["loss"] = M.cross_entropy(log_probs, [labels.index(t) for labels, t in zip(label_lists, y_true)])
    samples = [
        {"prompt": r.prompt, "prediction": p, "target": t, "correct": p == t, "scores": dict(zip(labels, ll))}
        for r, p, t, labels, ll in zip(task.records, y_pred, y_true, label_lists, lls)
    ]
    return {"metrics": metrics, "per_class": per_class, "samples": samples}


def greedy_responses(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Prompt], chat: bool, batch_size: int,
                     max_new_tokens: int, system: str | None = None, progress: bool = False,
                     desc: str = "generating") -> list[str]:
    """Greedy responses to ``prompts`` (``igpt.sampling.generate`` with temperature 0), ``batch_size`` at a time."""
    from igpt.sampling import generate

    out: list[str] = []
    with eval_mode(model), tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            out += generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=0.0, chat=chat,
                            system=system, batch_size=batch_size)
            bar.update(len(chunk))
    return out


def eval_generate(model: torch.nn.Module, tokenizer: Any, task: Task, chat: bool, batch_size: int, max_new_tokens: int,
                  normalize: Sequence[str], system: str | None = None, progress: bool = False) -> dict[str, Any]:
    responses = greedy_responses(model, tokenizer, [r.prompt for r in task.records], chat, batch_size,
                                 max_new_tokens, system, progress, f"{task.name}: generating")
    y_pred = [M.normalize_answer(x, normalize) for x in responses]
    y_true = [M.normalize_answer(r.fields["target"], normalize) for r in task.records]
    label_set = sorted(set(y_true))
    metrics, per_class = M.classification_metrics(y_true, y_pred, label_set)
    allowed = set(label_set)
    metrics = {
        "exact_match": metrics["accuracy"],
        **metrics,
        "valid": sum(p in allowed for p in y_pred) / len(y_pred),
    }
    samples = [
        {"prompt": r.prompt, "response": x, "prediction": p, "target": t, "correct": p == t}
        for r, x, p, t in zip(task.records, responses, y_pred, y_true)
    ]
    return {"metrics": metrics, "per_class": per_class, "samples": samples}


def eval_text_perplexity(model: torch.nn.Module, tokenizer: Any, task: Task, batch_size: int,
                         progress: bool = False) -> dict[str, Any]:
    """Loss (nats per token), bits per UTF-8 byte and next-token accuracy of a text file read as one document."""
    from igpt.data.chat import encode_text
    from igpt.data.formats import read_text

    text = read_text(task.path)
    tokens = encode_text(tokenizer, text)
    if not tokens:
        raise ValueError(f"task {task.path}: the text is empty")
    requests = rolling_windows(tokens, (ChatFormat.of(tokenizer).doc_start_ids() or [0])[0], max_seq_len(model))
    scores = score_requests(model, requests, batch_size, _pad_id(tokenizer), progress, f"{task.name}: perplexity")
    nats = -sum(s.logprob for s in scores)
    n = sum(s.tokens for s in scores)
    metrics = {
        "loss": nats / n,
        "bpb": nats / math.log(2) / len(text.encode("utf-8")),
        "accuracy": sum(s.greedy_tokens for s in scores) / n,
        "tokens": float(n),
    }
    return {"metrics": metrics, "samples": []}


def eval_prepared_perplexity(model: torch.nn.Module, tokenizer: Any, task: Task, batch_size: int,
                             progress: bool = False) -> dict[str, Any]:
    """The same metrics over the ``val`` split of a prepared dataset (kind text or sft: the loss tokens only)."""
    import json

    from igpt.data.loader import ShardLoader
    from igpt.data.tokenizer import load_tokenizer, token_bytes

    with open(os.path.join(task.path, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    if index["kind"] not in ("text", "sft"):
        raise ValueError(f"task {task.path}: perplexity reads kind=text or kind=sft data, not kind={index['kind']}")
    theirs = load_tokenizer(os.path.join(task.path, "tokenizer.json"))
    if theirs.get_vocab(with_added_tokens=True) != tokenizer.get_vocab(with_added_tokens=True):
        raise ValueError(f"task {task.path}: prepared with another tokenizer than the checkpoint's")
    split = "val" if index["splits"].get("val", {}).get("samples") else "train"
    loader = ShardLoader(task.path, split, seq_len=max_seq_len(model), global_batch_size=batch_size,
                         num_partitions=1, shuffle=False, loop=False)
    device = next(model.parameters()).device
    nbytes_of = token_bytes(tokenizer).to(device)
    nats = correct = ntok = nbytes = 0.0
    with eval_mode(model), tqdm(desc=f"{task.name}: perplexity", disable=not progress, leave=False) as bar:
        for batch in loader:
            labels = batch["labels"].to(device)
            keep = labels != -100  # (B, S)
            if not keep.any():
                continue
            logits = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device))  # (B, S, V)
            picked = logits[keep].float()  # (N, V)
            target = labels[keep]  # (N,)
            nats -= float(torch.log_softmax(picked, -1).gather(-1, target[:, None]).double().sum())
            correct += float((picked.argmax(-1) == target).sum())
            ntok += float(keep.sum())
            nbytes += float(nbytes_of[target].sum())
            bar.update(1)
    if ntok == 0:
        raise ValueError(f"task {task.path}: the {split} split holds no loss tokens")
    metrics = {"loss": nats / ntok, "bpb": nats / math.log(2) / max(nbytes, 1.0), "accuracy": correct / ntok,
               "tokens": ntok}
    return {"metrics": metrics, "samples": []}


def eval_preference(model: torch.nn.Module, tokenizer: Any, task: Task, chat: bool, batch_size: int,
                    max_new_tokens: int, judge: Scorer, reference_model: torch.nn.Module | None = None,
                    system: str | None = None, progress: bool = False) -> dict[str, Any]:
    prompts = [r.prompt for r in task.records]
    if task.form == "pairwise":
        chosen = [r.fields["chosen"] for r in task.records]
        rejected = [r.fields["rejected"] for r in task.records]
        metrics, rows = pairwise_accuracy(judge, prompts, chosen, rejected)
        samples = [{"prompt": p, "prediction": "chosen" if x["win"] >= 1 else "rejected" if x["win"] <= 0 else "tie",
                    "target": "chosen", **x} for p, x in zip(prompts, rows)]
        return {"metrics": metrics, "samples": samples}
    missing = [r.where for r in task.records if "reference" not in r.fields]
    references = [r.fields.get("reference", "") for r in task.records]
    if missing:
        if reference_model is None:
            raise ValueError(f'{missing[0]}: no "reference" response and no reference model (reference=<checkpoint>)')
        idx = [i for i, r in enumerate(task.records) if "reference" not in r.fields]
        generated = greedy_responses(reference_model, tokenizer, [prompts[i] for i in idx], chat, batch_size,
                                     max_new_tokens, system, progress, f"{task.name}: reference responses")
        for i, text in zip(idx, generated):
            references[i] = text
    responses = greedy_responses(model, tokenizer, prompts, chat, batch_size, max_new_tokens, system, progress,
                                 f"{task.name}: responses")
    metrics, rows = win_rate(judge, prompts, responses, references)
    samples = [{"prompt": p, "prediction": x, "target": ref, **row}
               for p, x, ref, row in zip(prompts, responses, references, rows)]
    return {"metrics": metrics, "samples": samples}


# ------------------------------------------------------------------------------------------------------- tasks
def load_tasks(tasks: Sequence[str | Task] | str) -> list[Task]:
    """Read task paths (a list, or a comma-separated string); ValueError when two tasks share a name."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    out = [t if isinstance(t, Task) else read_task(str(t)) for t in tasks]
    if not out:
        raise ValueError("tasks: expected at least one task file")
    names: dict[str, str] = {}
    for t in out:
        if t.name in names:
            raise ValueError(f"tasks {names[t.name]} and {t.path} have the same name {t.name!r}; rename one")
        names[t.name] = t.path
    return out


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | Task] | str,
    *,
    chat: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    normalize: str | Sequence[str] = M.DEFAULT_NORMALIZE,
    system: str | None = None,
    judge: Scorer | None = None,
    reference_model: torch.nn.Module | None = None,
    baselines: str | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on every task; ``{task name: {"kind", "records", "metrics", "samples"[, "per_class",
    "baselines"]}}``, the content of ``results.json``.

    ``chat``: use the chat template (SFT and later checkpoints). ``judge``: the scorer of preference tasks.
    ``reference_model``: generates the reference responses of win-rate records without a ``"reference"``.
    ``baselines``: a classify/generate file to fit the majority-class and TF-IDF + logistic-regression baselines on;
    they are scored on every classify and generate task.
    """
    steps = M.parse_normalize(normalize)
    results: dict[str, dict[str, Any]] = {}
    for task in load_tasks(tasks):
        if task.kind == "choice":
            out = eval_choice(model, tokenizer, task, chat, batch_size, system, progress)
        elif task.kind == "classify":
            out = eval_classify(model, tokenizer, task, chat, batch_size, system, progress)
        elif task.kind == "generate":
            out = eval_generate(model, tokenizer, task, chat, batch_size, max_new_tokens, steps, system, progress)
        elif task.kind == "perplexity":
            fn = eval_prepared_perplexity if task.form == "prepared" else eval_text_perplexity
            out = fn(model, tokenizer, task, batch_size, progress)
        else:
            if judge is None:
                raise ValueError(f"task {task.path}: a preference task needs a judge (judge=<reward model or "
                                 f"module:function>)")
            out = eval_preference(model, tokenizer, task, chat, batch_size, max_new_tokens, judge, reference_model,
                                  system, progress)
        entry = {"kind": task.kind, "records": len(task.records), **out}
        if baselines and task.kind in ("classify", "generate"):
            entry["baselines"] = _baselines(baselines, task, steps)
        results[task.name] = entry
    return results


def _baselines(train_path: str, task: Task, steps: Sequence[str]) -> dict[str, dict[str, float]]:
    """Baselines fitted on ``train_path`` and scored on ``task`` (generate: the normalised targets are the classes)."""
    from igpt.eval.baselines import prompt_text, read_labelled, run_baselines

    train_texts, train_labels = read_labelled(train_path)
    texts = [prompt_text(r.prompt) for r in task.records]
    if task.kind == "classify":
        return run_baselines(train_texts, train_labels, texts, [r.fields["label"] for r in task.records], task.labels)
    y_true = [M.normalize_answer(r.fields["target"], steps) for r in task.records]
    train_y = [M.normalize_answer(t, steps) for t in train_labels]
    return run_baselines(train_texts, train_y, texts, y_true, sorted(set(y_true)))


def run_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str | Task] | str, **kwargs: Any
) -> dict[str, dict[str, float]]:
    """``{task name: metrics}``: ``evaluate`` without the samples (what a trainer logs every ``eval_every`` steps)."""
    return {name: entry["metrics"] for name, entry in evaluate(model, tokenizer, tasks, **kwargs).items()}


def metric_keys(metrics: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """``{"topics": {"accuracy": 0.5}}`` -> ``{"eval/topics/accuracy": 0.5}``: the keys of metrics.jsonl and W&B."""
    return {f"{prefix}/{task}/{k}": float(v) for task, m in metrics.items() for k, v in m.items()}
