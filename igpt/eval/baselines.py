"""Baselines for classification tasks, fitted on a training file and scored on the task's records.

The reference point every classification result needs (the seed system printed its fine-tuned model next to logistic
regression and an RNN): a model that learned nothing beyond the label frequencies, and a strong bag-of-words model.

- ``majority``: always the most frequent training label (ties: the first seen); its probabilities are the training
  label frequencies, so its loss is the cross-entropy of the prior.
- ``tfidf_logreg``: scikit-learn's ``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)`` on the prompt text and
  ``LogisticRegression(max_iter=1000)`` with its default regularisation (C=1); no tuning on the evaluated records.

Both return the metrics of ``igpt.eval`` for the same records: ``accuracy``, ``macro_f1`` and ``loss`` (mean
cross-entropy of the true label; a label never seen in training gets probability 1e-12).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from igpt.eval.metrics import classification_metrics
from igpt.eval.tasks import Prompt, read_task

_FLOOR = 1e-12


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: a message list becomes its contents joined by newlines."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def read_labelled(path: str) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a classify (``"label"``) or generate (``"target"``) task file."""
    task = read_task(path)
    if task.kind not in ("classify", "generate"):
        raise ValueError(f"baselines={path}: expected classify or generate records, the file holds {task.kind}")
    key = "label" if task.kind == "classify" else "target"
    return [prompt_text(r.prompt) for r in task.records], [r.fields[key] for r in task.records]


def _loss(probs: Sequence[dict[str, float]], y_true: Sequence[str]) -> float:
    return -sum(math.log(max(p.get(t, 0.0), _FLOOR)) for p, t in zip(probs, y_true)) / len(y_true)


def majority(train_labels: Sequence[str], y_true: Sequence[str], label_set: Sequence[str] | None = None):
    """Metrics of the majority-class predictor (module docstring)."""
    counts = Counter(train_labels)
    top = max(counts, key=lambda k: (counts[k], -list(counts).index(k)))
    prior = {k: v / len(train_labels) for k, v in counts.items()}
    metrics, _ = classification_metrics(y_true, [top] * len(y_true), label_set)
    return {**metrics, "loss": _loss([prior] * len(y_true), y_true)}


def tfidf_logreg(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    texts: Sequence[str],
    y_true: Sequence[str],
    label_set: Sequence[str] | None = None,
    seed: int = 0,
):
    """Metrics of TF-IDF + logistic regression (module docstring)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(vectorizer.fit_transform(train_texts), train_labels)
    proba = clf.predict_proba(vectorizer.transform(texts))  # (N, classes)
    classes = [str(c) for c in clf.classes_]
    probs = [dict(zip(classes, row.tolist())) for row in proba]
    preds = [classes[int(row.argmax())] for row in proba]
    metrics, _ = classification_metrics(y_true, preds, label_set)
    return {**metrics, "loss": _loss(probs, y_true)}


def run_baselines(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    texts: Sequence[str],
    y_true: Sequence[str],
    label_set: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{"majority": metrics, "tfidf_logreg": metrics}`` on the records ``(texts, y_true)``."""
    return {
        "majority": majority(train_labels, y_true, label_set),
        "tfidf_logreg": tfidf_logreg(train_texts, train_labels, texts, y_true, label_set),
    }
