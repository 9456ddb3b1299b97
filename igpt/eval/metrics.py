"""Metrics of ``igpt.eval``: answer normalisation, classification metrics, multiple-choice accuracy, cross-entropy.

- Classification (``classify`` and ``generate``): accuracy over all records, and per-class precision, recall, F1 and
  support from scikit-learn's ``precision_recall_fscore_support`` (``zero_division=0``); ``macro_f1`` is the unweighted
  mean of the per-class F1 over the label set (the classes that occur as a target or as a prediction inside the label
  set, scikit-learn's default). For ``generate`` the label set is the set of normalised targets: an answer outside it
  is wrong for its record's class (a false negative) and a false positive for no class.
- Multiple choice (``choice``): lm-evaluation-harness's ``acc`` (argmax of the summed log-likelihoods) and ``acc_norm``
  (argmax of the log-likelihood divided by the length of the choice in characters, ``len(choice)``, as its
  ``process_results`` for ``multiple_choice`` does).
- Cross-entropy of the true class (the ``loss`` of a classifier): the mean over records of ``-log p(true)`` where
  ``p = softmax(scores)`` over the record's candidate labels. For ``classify`` the scores are the labels'
  log-likelihoods, so ``p`` is the model's distribution restricted to the label set; baselines use their predicted
  probabilities, so the numbers compare.
- Normalisation of generated answers: the steps named in ``normalize=`` (comma-separated, applied in this order):
  ``first_line`` (keep the text before the first newline), ``lower``, ``punctuation`` (drop ``string.punctuation``),
  ``articles`` (drop the words a/an/the), ``whitespace`` (collapse runs of white space, strip both ends); ``none``
  compares the raw strings. The default, ``lower,punctuation,whitespace``, is SQuAD's answer normalisation
  (Rajpurkar et al. 2016) without the article rule.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

NORMALIZE_STEPS = ("first_line", "lower", "punctuation", "articles", "whitespace")
DEFAULT_NORMALIZE = "lower,punctuation,whitespace"

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def parse_normalize(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"lower,punctuation"`` -> ``("lower", "punctuation")``; ValueError naming an unknown step."""
    steps = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    steps = [s for s in steps if s and s != "none"]
    bad = [s for s in steps if s not in NORMALIZE_STEPS]
    if bad:
        raise ValueError(f"normalize={spec!r}: unknown step {bad[0]!r}; expected none or a list of {NORMALIZE_STEPS}")
    return tuple(s for s in NORMALIZE_STEPS if s in steps)


def normalize_answer(text: str, steps: Sequence[str]) -> str:
    """Apply the normalisation ``steps`` (module docstring) to ``text``."""
    if "first_line" in steps:
        text = text.strip("\n").split("\n", 1)[0] if text.strip() else ""
    if "lower" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = text.translate(_PUNCT)
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    return text


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], label_set: Sequence[str] | None = None
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``({"accuracy", "macro_f1"}, {label: {"precision", "recall", "f1", "support"}})`` (module docstring).

    ``label_set`` (default: the targets) bounds the classes: predictions outside it belong to no class.
    """
    from igpt.errors import require

    precision_recall_fscore_support = require("sklearn.metrics", "eval", "macro-F1").precision_recall_fscore_support

    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"need as many predictions as targets, at least one: got {len(y_pred)} and {len(y_true)}")
    allowed = set(label_set if label_set is not None else y_true)
    labels = sorted(set(y_true) | (set(y_pred) & allowed))
    precision, recall, f1, support = precision_recall_fscore_support(
        list(y_true), list(y_pred), labels=labels, average=None, zero_division=0
    )
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)
    return {"accuracy": accuracy, "macro_f1": float(sum(f1) / len(labels))}, per_class


def choice_metrics(logprobs: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], answers: Sequence[int]):
    """``{"accuracy", "accuracy_norm"}`` and the per-record predictions ``(pred, pred_norm)`` (module docstring)."""
    preds, preds_norm = [], []
    for lls, chs in zip(logprobs, choices):
        preds.append(_argmax(lls))
        preds_norm.append(_argmax([ll / len(c) for ll, c in zip(lls, chs)]))
    n = len(answers)
    metrics = {
        "accuracy": sum(p == a for p, a in zip(preds, answers)) / n,
        "accuracy_norm": sum(p == a for p, a in zip(preds_norm, answers)) / n,
    }
    return metrics, list(zip(preds, preds_norm))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index wins a tie, as numpy's argmax


def log_softmax(scores: Sequence[float]) -> list[float]:
    """``log softmax`` of a list of floats (max-shifted, so large log-likelihoods do not overflow)."""
    top = max(scores)
    log_z = top + math.log(sum(math.exp(s - top) for s in scores))
    return [s - log_z for s in scores]


def cross_entropy(log_probs: Sequence[Sequence[float]], true_index: Sequence[int]) -> float:
    """Mean ``-log p(true)`` over records, from each record's log-probabilities of its candidate classes."""
    return -sum(lp[i] for lp, i in zip(log_probs, true_index)) / len(true_index)
