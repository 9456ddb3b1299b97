"""Baselines for classification tasks, fitted on a training file and scored on the task's records.

The reference point every classification result needs (the seed system printed its fine-tuned model next to logistic
regression and an RNN): a model that learned nothing beyond the label frequencies, and a strong bag-of-words model.

- ``majority``: always the most frequent training label (ties: the first seen); its probabilities are the training
  label frequencies, so its loss is the cross-entropy of the prior.
- ``tfidf_logreg``: scikit-learn's ``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)`` on the prompt text and
  ``LogisticRegression``; its inverse regularisation strength C is picked from 0.1, 1, 10, 100 by stratified 3-fold
  cross-validation (accuracy; vectorizer and classifier refitted per fold) on the training file alone, then the pair
  is refitted on all of it (C=1 without cross-validation when a class has a single training example). Nothing is
  tuned on the evaluated records. With its default C=1 a bag-of-words model on a few hundred examples underfits
  badly (on the demo's topics: 0.64 accuracy, against 0.87 with C chosen by cross-validation), which would flatter
  any model compared with it. Fits run on one thread: the problems are small, and BLAS threads only contend with the
  model's.

Both return the metrics of ``igpt.eval`` for the same records: ``accuracy``, ``macro_f1`` and ``loss`` (mean
cross-entropy of the true label; a label never seen in training gets probability 1e-12); ``tfidf_logreg`` also its
chosen ``C``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from igpt.eval.metrics import classification_metrics
from igpt.eval.tasks import Prompt, read_task

_FLOOR = 1e-12
C_GRID = (0.1, 1.0, 10.0, 100.0)


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
    from igpt.errors import require

    require("sklearn", "eval", "igpt.eval's baselines=")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from threadpoolctl import threadpool_limits

    def model(c: float):
        return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                             LogisticRegression(C=c, max_iter=2000, random_state=seed))

    folds = min(3, min(Counter(train_labels).values()))
    with threadpool_limits(limits=1):
        best = 1.0
        if folds >= 2:  # the vectorizer is refitted inside each fold, so no held-out fold leaks into its vocabulary
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            scores = [cross_val_score(model(c), list(train_texts), list(train_labels), cv=cv).mean() for c in C_GRID]
            best = C_GRID[max(range(len(C_GRID)), key=lambda i: (scores[i], -i))]  # ties: the stronger regularisation
        clf = model(best).fit(list(train_texts), list(train_labels))
        proba = clf.predict_proba(list(texts))  # (N, classes)
    classes = [str(c) for c in clf.classes_]
    probs = [dict(zip(classes, row.tolist())) for row in proba]
    preds = [classes[int(row.argmax())] for row in proba]
    metrics, _ = classification_metrics(y_true, preds, label_set)
    return {**metrics, "loss": _loss(probs, y_true), "C": float(best)}


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
