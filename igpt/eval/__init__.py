"""Evaluation users trust: task files scored on a model, with baselines, as a CLI and as a Python API.

    python -m igpt.eval checkpoint=<run or checkpoint dir> tasks=<a.jsonl,b.jsonl> [output=results.json]
        [batch_size=8] [max_new_tokens=64] [normalize=lower,punctuation,whitespace] [chat=auto] [system=...]
        [device=auto] [baselines=<train.jsonl>] [judge=<reward model dir | module:function>] [reference=<dir>]

The kind of a task follows from its records (``igpt/eval/tasks.py``): generate, choice, classify, preference, or
perplexity for a ``.txt`` file or a prepared dataset folder. ``results.json`` maps each task's file stem to
``{"kind", "records", "metrics", "samples"[, "per_class", "baselines"]}``; every kind reports ``accuracy``, classify
and generate also ``macro_f1``. docs/evaluation.md describes each metric.

Python API (what the trainer calls every ``trainer.eval_every`` steps; no global state, no ``torch.distributed``)::

    from igpt.eval import run_tasks, metric_keys
    metrics = run_tasks(model, tokenizer, ["topics.jsonl"], chat=True, batch_size=16)  # {"topics": {...}}
    record = metric_keys(metrics)                                                      # {"eval/topics/accuracy": ...}

``evaluate`` returns the samples too. The scoring core (``igpt.eval.scoring``) is shared with the lm-evaluation-harness
backend (``igpt.lm_eval``).
"""

from igpt.eval.metrics import DEFAULT_NORMALIZE
from igpt.eval.preference import Scorer, load_scorer, pairwise_accuracy, reward_model_scorer, win_rate
from igpt.eval.runner import answer_pair, evaluate, load_tasks, metric_keys, run_tasks
from igpt.eval.scoring import Score, rolling_windows, score_requests
from igpt.eval.tasks import Task, read_task

__all__ = [
    "DEFAULT_NORMALIZE",
    "Score",
    "Scorer",
    "Task",
    "answer_pair",
    "evaluate",
    "load_scorer",
    "load_tasks",
    "metric_keys",
    "pairwise_accuracy",
    "read_task",
    "reward_model_scorer",
    "rolling_windows",
    "run_tasks",
    "score_requests",
    "win_rate",
]
