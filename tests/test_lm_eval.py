"""Tests for igpt/lm_eval.py: the lm_eval ``igpt`` model equals lm_eval's own ``hf`` backend on the exported model.

Local tasks only (a task YAML and JSONL written here, read through ``datasets``' ``json`` builder); the HF caches and
offline switches are set so nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, WORDS
from tests.test_export import random_model
from tests.test_generate import write_checkpoint

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}

TASKS = {
    # multiple choice: acc / acc_norm from loglikelihood requests
    "igpt_choice": {"output_type": "multiple_choice", "doc_to_text": "{{prompt}}", "doc_to_choice": "choices",
                    "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    # one continuation per document; some contexts are longer than max_seq_len, so they are cut at the left
    "igpt_ll": {"output_type": "loglikelihood", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    # greedy generation until a stop string
    "igpt_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                 "generation_kwargs": {"until": ["."], "max_gen_toks": 10, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
    # perplexity of whole documents, several max_seq_len windows long
    "igpt_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                 {"metric": "bits_per_byte"}]},
}


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def write_tasks(folder) -> str:
    """Four local lm_eval tasks (YAML + JSONL) under ``folder``; returns the folder for ``include_path``."""
    rng = random.Random(0)
    docs = {
        "igpt_choice": [{"prompt": _sentence(rng, 2, 12).capitalize(),
                         "choices": [_sentence(rng, 1, 4) for _ in range(3)], "answer": rng.randrange(3)}
                        for _ in range(8)],
        "igpt_ll": [{"prompt": _sentence(rng, 2, 80), "target": " " + _sentence(rng, 1, 5)} for _ in range(8)],
        "igpt_gen": [{"prompt": _sentence(rng, 2, 10), "target": _sentence(rng, 1, 2)} for _ in range(6)],
        "igpt_ppl": [{"text": _sentence(rng, 20, 160) + "."} for _ in range(4)],
    }
    os.makedirs(folder, exist_ok=True)
    for name, cfg in TASKS.items():
        data = os.path.join(folder, f"{name}.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs[name])
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
                "test_split": "test", **cfg, "metadata": {"version": 1.0}}
        with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
            json.dump(spec, f)  # JSON is YAML
    return str(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_file):
    """A random tiny igpt checkpoint with sharp logits (no greedy near-ties), its HF export and local tasks."""
    from igpt.export import main as export_main

    root = tmp_path_factory.mktemp("lm_eval")
    for key, value in {**OFFLINE, "HF_HOME": str(root / "hf_home"), "HF_DATASETS_CACHE": str(root / "ds")}.items():
        os.environ.setdefault(key, value)
    model = random_model(False, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    run = str(root / "run")
    write_checkpoint(run, model, tokenizer_file, stage="pretrain")
    hf = str(root / "hf")
    assert export_main([f"checkpoint={run}", f"output={hf}"]) == 0
    return {"run": run, "hf": hf, "tasks": write_tasks(root / "tasks"), "root": root}


def _evaluate(model, tasks_dir: str, names: list[str], **kw):
    from lm_eval.tasks import TaskManager

    # only the local tasks: indexing lm_eval's thousands of built-in task YAMLs takes ~10 s each time
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, log_samples=True,
                                   bootstrap_iters=0, **kw)


def _responses(out, task: str) -> list:
    """Per request, in document order: the model's raw answers (log-likelihoods or generated text)."""
    rows = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [r for s in rows for r in s["resps"]]


def _flat(x):
    return [v for item in x for v in (_flat(item) if isinstance(item, (list, tuple)) else [item])]


@pytest.mark.integration
def test_igpt_backend_equals_hf_backend_on_export(exported):
    from igpt.lm_eval import IgptLM

    # Apples to apples: igpt starts every document with <|endoftext|>, so the igpt backend puts it before every
    # context (add_bos_token=True by default); HFLM does the same with add_bos_token=True, which the exported tokenizer
    # honours (its bos_token is <|endoftext|>). Rolling perplexity is the exception: there the igpt backend scores the
    # text after one <|endoftext|> (the prefix token), while HFLM with add_bos_token=True would also score an extra
    # <|endoftext|> (EleutherAI/lm-evaluation-harness#3333), so that task is compared with add_bos_token=False.
    hf_args = {"pretrained": exported["hf"], "dtype": "float32", "device": "cpu", "batch_size": 3}
    lm = IgptLM(checkpoint=exported["run"], batch_size=3, device="cpu")
    ours = _evaluate(lm, exported["tasks"], list(TASKS))
    prompts = [s["doc"]["prompt"] for s in ours["samples"]["igpt_ll"]]
    assert max(len(lm.tok_encode(p)) for p in prompts) > lm.max_length  # some contexts are cut at the left
    theirs = _evaluate("hf", exported["tasks"], ["igpt_choice", "igpt_ll", "igpt_gen"],
                       model_args={**hf_args, "add_bos_token": True})
    theirs_ppl = _evaluate("hf", exported["tasks"], ["igpt_ppl"], model_args={**hf_args, "add_bos_token": False})
    for task in TASKS:
        ref = theirs_ppl if task == "igpt_ppl" else theirs
        a, b = _responses(ours, task), _responses(ref, task)
        assert len(a) == len(b) > 0
        if task == "igpt_gen":
            assert a == b and any(x.strip() for x in _flat(a))
        else:
            torch.testing.assert_close(torch.tensor(_flat(a), dtype=torch.float64),
                                       torch.tensor(_flat(b), dtype=torch.float64), atol=1e-4, rtol=0)
        for metric, value in ref["results"][task].items():
            if isinstance(value, float) and not metric.endswith("stderr,none"):
                got = ours["results"][task][metric]
                if "perplexity" in metric:  # exp(mean NLL) of a random model (~1e11): compare the mean NLL
                    got, value = math.log(got), math.log(value)
                assert got == pytest.approx(value, abs=1e-4), (task, metric)


@pytest.mark.integration
def test_cli_registers_model_and_hands_over_to_lm_eval(exported):
    """As documented, without --device: lm_eval's own default (cuda:0) must not override igpt's device=auto."""
    out = exported["root"] / "cli_out"
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-m", "igpt.lm_eval", "--model", "igpt",
         "--model_args", f"checkpoint={exported['run']},batch_size=4", "--tasks", "igpt_choice",
         "--include_path", exported["tasks"], "--output_path", str(out), "--limit", "3"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "igpt_choice" in proc.stdout and "acc" in proc.stdout
    results = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    with open(results[0], encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["config"]["model"] == "igpt" and saved["config"]["model_args"]["batch_size"] == 4
    assert 0.0 <= saved["results"]["igpt_choice"]["acc,none"] <= 1.0
