"""Tests for igpt/eval/: task files, metrics against hand computations, log-likelihood scoring against direct
computation (also with contexts cut to fit max_seq_len), batching, every task kind, baselines and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from igpt.config import ModelConfig
from igpt.data.chat import encode_chat, encode_document
from igpt.data.tokenizer import load_tokenizer
from igpt.eval import (
    answer_pair,
    evaluate,
    metric_keys,
    pairwise_accuracy,
    read_task,
    rolling_windows,
    run_tasks,
    score_requests,
    win_rate,
)
from igpt.eval.__main__ import main as eval_main
from igpt.eval.metrics import choice_metrics, classification_metrics, cross_entropy, log_softmax, normalize_answer
from igpt.model import Transformer
from tests.test_generate import write_checkpoint

CFG = dict(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CFG)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper logits: greedy answers without near-ties
    return model


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


# ------------------------------------------------------------------------------------------------ metrics by hand
def test_classification_metrics_equal_hand_computation():
    y_true = ["a", "a", "b", "b", "c", "c"]
    y_pred = ["a", "b", "b", "b", "c", "a"]
    metrics, per_class = classification_metrics(y_true, y_pred)
    # a: TP 1, FP 1 (the c predicted as a), FN 1 | b: TP 2, FP 1, FN 0 | c: TP 1, FP 0, FN 1
    hand = {"a": (1 / 2, 1 / 2), "b": (2 / 3, 2 / 2), "c": (1 / 1, 1 / 2)}
    f1 = {k: 2 * p * r / (p + r) for k, (p, r) in hand.items()}
    for label, (p, r) in hand.items():
        assert per_class[label]["precision"] == pytest.approx(p)
        assert per_class[label]["recall"] == pytest.approx(r)
        assert per_class[label]["f1"] == pytest.approx(f1[label])
        assert per_class[label]["support"] == 2
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_generated_answers_outside_the_label_set_count_for_no_class():
    # "zzz" is wrong for its record (a false negative of "b") but a false positive of no class
    metrics, per_class = classification_metrics(["a", "b", "b"], ["a", "zzz", "b"], label_set=["a", "b"])
    assert set(per_class) == {"a", "b"}
    assert per_class["b"]["precision"] == 1.0 and per_class["b"]["recall"] == 0.5
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 2 * 1.0 * 0.5 / 1.5) / 2)


def test_choice_accuracy_and_length_normalised_accuracy():
    # record 0: raw argmax picks "ab" (-4 > -6); per character -4/2 = -2 < -6/6 = -1 picks "abcdef"
    # record 1: both pick index 1; record 2: ties go to the first index (numpy's argmax)
    lls = [[-4.0, -6.0], [-9.0, -3.0, -8.0], [-2.0, -2.0]]
    choices = [["ab", "abcdef"], ["x", "yy", "zzz"], ["p", "q"]]
    metrics, preds = choice_metrics(lls, choices, answers=[1, 1, 0])
    assert preds == [(0, 1), (1, 1), (0, 0)]
    assert metrics == {"accuracy": pytest.approx(2 / 3), "accuracy_norm": pytest.approx(3 / 3)}


def test_cross_entropy_of_the_true_label():
    scores = [[-1.0, -2.0, -4.0], [-3.0, -0.5, -3.0]]
    log_probs = [log_softmax(s) for s in scores]
    hand = [-math.log(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-4))),
            -math.log(math.exp(-3) / (2 * math.exp(-3) + math.exp(-0.5)))]
    assert cross_entropy(log_probs, [0, 2]) == pytest.approx(sum(hand) / 2)


def test_normalisation_steps():
    text = "  The Answer: Greetings!\nand more"
    assert normalize_answer(text, ("lower", "punctuation", "whitespace")) == "the answer greetings and more"
    steps = ("first_line", "lower", "punctuation", "articles", "whitespace")
    assert normalize_answer(text, steps) == "answer greetings"
    assert normalize_answer(text, ()) == text


def test_preference_metrics_with_a_stub_scorer():
    def scorer(prompts, completions):  # longer is better; the prompt is passed through untouched
        assert len(prompts) == len(completions)
        return [float(len(c)) for c in completions]

    metrics, rows = pairwise_accuracy(scorer, ["p"] * 3, ["long one", "a", "same"], ["short", "bb", "same"])
    assert metrics["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics["margin"] == pytest.approx(((8 - 5) + (1 - 2) + 0) / 3)
    assert [r["win"] for r in rows] == [1.0, 0.0, 0.5]
    metrics, _ = win_rate(scorer, ["p", "q"], ["xxxx", "x"], ["yy", "yy"])
    assert metrics["win_rate"] == metrics["accuracy"] == 0.5 and metrics["reward"] == 2.5


# ------------------------------------------------------------------------------------------------ task files
def test_task_kinds_and_bad_records_name_file_and_line(tmp_path):
    kinds = {
        "gen": ({"prompt": "q", "target": "a"}, "generate"),
        "mc": ({"prompt": "q", "choices": ["a", "b"], "answer": 1}, "choice"),
        "cls": ({"prompt": "q", "label": "x", "labels": ["x", "y"]}, "classify"),
        "pair": ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        "wr": ({"messages": [{"role": "user", "content": "q"}], "reference": "a"}, "preference"),
    }
    for name, (rec, kind) in kinds.items():
        assert read_task(write_jsonl(tmp_path / f"{name}.jsonl", [rec])).kind == kind
    (tmp_path / "t.txt").write_text("some text\n")
    assert read_task(str(tmp_path / "t.txt")).kind == "perplexity"

    bad = [
        ([{"prompt": "q", "label": "x"}, {"prompt": "q", "target": "a"}], "bad.jsonl:2: a generate record"),
        (['{"prompt": "q", "label": "x"}', "{not json"], "bad.jsonl:2: invalid JSON"),
        ([{"prompt": "q", "choices": ["a", "b"], "answer": 2}], 'bad.jsonl:1: "answer" must be an index'),
        ([{"prompt": "q", "label": "x", "labels": ["y", "z"]}], 'bad.jsonl:1: "label" \'x\' is not one of'),
        ([{"question": "q", "label": "x"}], 'bad.jsonl:1: missing "prompt"'),
        ([{"prompt": 3, "target": "a"}], "bad.jsonl:1: 'prompt' must be a string"),
        ([{"prompt": "q", "chosen": "a"}], "bad.jsonl:1: 'rejected' must be a string"),
    ]
    for rows, message in bad:
        with pytest.raises(ValueError, match=message):
            read_task(write_jsonl(tmp_path / "bad.jsonl", rows))


# ------------------------------------------------------------------------------------------------ scoring
def direct_logprob(model: Transformer, ctx: list[int], cont: list[int]) -> float:
    """Each continuation token scored by its own forward pass over exactly the tokens the model may see before it
    (the last max_seq_len tokens of context + continuation), then summed."""
    window = (ctx + cont)[-(model.cfg.max_seq_len + 1) :]
    total = 0.0
    with torch.no_grad():
        for j in range(len(window) - len(cont), len(window)):
            logits = model(torch.tensor([window[:j]]))[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[window[j]])
    return total


def test_loglikelihood_equals_direct_sum_also_when_the_context_is_cut_and_batched_equals_unbatched():
    model = tiny_model(1)
    g = torch.Generator().manual_seed(2)
    lengths = [(3, 2), (10, 5), (1, 1), (40, 4), (25, 12), (60, 32), (7, 3)]  # 40+4, 25+12, 60+32 exceed 32 + 1
    requests = [(torch.randint(7, 384, (a,), generator=g).tolist(), torch.randint(7, 384, (b,), generator=g).tolist())
                for a, b in lengths]
    one = score_requests(model, requests, batch_size=1)
    many = score_requests(model, requests, batch_size=4)
    for (ctx, cont), s1, s4 in zip(requests, one, many):
        assert s1.logprob == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-4)
        assert s4.logprob == pytest.approx(s1.logprob, abs=1e-5) and s4.greedy_tokens == s1.greedy_tokens
        assert s1.tokens == len(cont)
    with pytest.raises(ValueError, match="does not fit max_seq_len=32"):
        score_requests(model, [([1], list(range(7, 40)))])


def test_rolling_windows_predict_every_token_once_as_lm_eval_does():
    tokens = list(range(10, 10 + 23))
    for window in (1, 4, 8, 23, 40):
        windows = rolling_windows(tokens, 0, window)
        assert [t for _, cont in windows for t in cont] == tokens
        for ctx, cont in windows:
            assert len(cont) <= window and len(ctx + cont) <= window + 1
        lm_utils = pytest.importorskip("lm_eval.utils")
        theirs = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(tokens, 0, window, 1)]
        assert windows == [(list(a), list(b)) for a, b in theirs]


def test_answer_tokens_follow_the_training_format(tokenizer_file):
    tok = load_tokenizer(tokenizer_file)
    ctx, cont = answer_pair(tok, "Which is it?", "the king", chat=True, end_of_answer=True)
    msgs = [{"role": "user", "content": "Which is it?"}, {"role": "assistant", "content": "the king"}]
    assert ctx + cont == encode_chat(tok, msgs)[0]  # exactly what SFT trained on
    ctx, cont = answer_pair(tok, "The crown is ", "heavy", chat=False)  # trailing space moves into the answer
    assert ctx + cont == encode_document(tok, "The crown is  heavy") and ctx == encode_document(tok, "The crown is")


# ------------------------------------------------------------------------------------------------ kinds end to end
@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    prompts = ["the king is dead", "sweet love my lady", "the sword and the blood", "my heart fair queen", "o night"]
    labels = ["war", "love", "war", "love", "love"]
    return {
        "cls": write_jsonl(root / "cls.jsonl", [{"prompt": p, "label": y} for p, y in zip(prompts, labels)]),
        "train": write_jsonl(root / "train.jsonl", [{"prompt": p + " too", "label": y}
                                                    for p, y in zip(prompts, labels)]),
        "mc": write_jsonl(root / "mc.jsonl", [{"prompt": p, "choices": ["is dead", "the queen", "alas"],
                                               "answer": i % 3} for i, p in enumerate(prompts)]),
        "gen": write_jsonl(root / "gen.jsonl", [{"prompt": p, "target": y} for p, y in zip(prompts, labels)]),
        "pair": write_jsonl(root / "pair.jsonl", [{"prompt": p, "chosen": "yes, " + y, "rejected": y}
                                                  for p, y in zip(prompts, labels)]),
        "wr": write_jsonl(root / "wr.jsonl", [{"prompt": p, "reference": "x" * i} for i, p in enumerate(prompts)]),
        "text": str(root / "text.txt"),
        "root": root,
    }


def test_every_kind_end_to_end_with_hand_checks(tasks, tokenizer_file):
    (tasks["root"] / "text.txt").write_text("The king is dead. " * 12 + "Long live the queen!\n", encoding="utf-8")
    model, tok = tiny_model(3), load_tokenizer(tokenizer_file)
    model.train()
    results = evaluate(model, tok, [tasks[k] for k in ("cls", "mc", "gen", "pair", "wr", "text")], batch_size=3,
                       max_new_tokens=4, judge=lambda p, c: [float(len(x)) for x in c], baselines=tasks["train"])
    assert model.training  # the mode is restored
    assert {k: v["kind"] for k, v in results.items()} == {"cls": "classify", "mc": "choice", "gen": "generate",
                                                         "pair": "preference", "wr": "preference", "text": "perplexity"}
    for name, entry in results.items():
        assert "accuracy" in entry["metrics"], name

    cls = results["cls"]
    for s in cls["samples"]:  # each label scored as the answer, by the scoring core
        ctx, cont = answer_pair(tok, s["prompt"], "war", chat=False)
        assert s["scores"]["war"] == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-4)
        assert s["prediction"] == max(s["scores"], key=s["scores"].get)
    y_true, y_pred = [s["target"] for s in cls["samples"]], [s["prediction"] for s in cls["samples"]]
    assert cls["metrics"]["accuracy"] == pytest.approx(sum(a == b for a, b in zip(y_true, y_pred)) / 5)
    hand_loss = sum(-math.log(math.exp(s["scores"][s["target"]]) / sum(math.exp(v) for v in s["scores"].values()))
                    for s in cls["samples"]) / 5
    assert cls["metrics"]["loss"] == pytest.approx(hand_loss)
    assert set(cls["baselines"]) == {"majority", "tfidf_logreg"}
    assert cls["baselines"]["majority"]["accuracy"] == pytest.approx(3 / 5)  # always "love"
    assert cls["baselines"]["majority"]["loss"] == pytest.approx(-(2 * math.log(2 / 5) + 3 * math.log(3 / 5)) / 5)

    gen = results["gen"]
    assert all(s["prediction"] == normalize_answer(s["response"], ("lower", "punctuation", "whitespace"))
               for s in gen["samples"])
    assert results["pair"]["metrics"]["accuracy"] == 1.0  # the stub prefers the longer response
    assert results["wr"]["metrics"]["win_rate"] == pytest.approx(
        sum(1.0 if len(s["prediction"]) > i else 0.5 if len(s["prediction"]) == i else 0.0
            for i, s in enumerate(results["wr"]["samples"])) / 5)

    text = (tasks["root"] / "text.txt").read_text(encoding="utf-8")
    from igpt.data.chat import encode_text

    ids = encode_text(tok, text)  # longer than max_seq_len: several windows
    assert len(ids) > 2 * CFG["max_seq_len"]
    nats = -sum(direct_logprob(model, ctx, cont) for ctx, cont in rolling_windows(ids, 0, CFG["max_seq_len"]))
    m = results["text"]["metrics"]
    assert m["loss"] == pytest.approx(nats / len(ids), rel=1e-5)
    assert m["bpb"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)

    flat = metric_keys(run_tasks(model, tok, [tasks["cls"]], batch_size=2))
    assert flat["eval/cls/accuracy"] == cls["metrics"]["accuracy"]
    assert flat["eval/cls/loss"] == pytest.approx(cls["metrics"]["loss"], abs=1e-5)


def test_prepared_dataset_perplexity(tokenizer_file, prepared_text_dir):
    m = run_tasks(tiny_model(4), load_tokenizer(tokenizer_file), [prepared_text_dir], batch_size=8)
    (name,) = m
    assert m[name]["tokens"] > 1000 and 0 <= m[name]["accuracy"] <= 1
    assert m[name]["loss"] == pytest.approx(math.log(384), rel=0.5)  # a random model: about uniform


def test_cli_writes_results_and_names_bad_records(tmp_path, tasks, tokenizer_file, capsys):
    run = str(tmp_path / "run")
    write_checkpoint(run, tiny_model(5), tokenizer_file, stage="sft")
    out = str(tmp_path / "results.json")
    code = eval_main([f"checkpoint={run}", f"tasks={tasks['cls']},{tasks['gen']}", f"output={out}",
                      f"baselines={tasks['train']}", "batch_size=4", "max_new_tokens=3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "majority class" in printed and "tf-idf + logistic regression" in printed and "macro_f1" in printed
    with open(out, encoding="utf-8") as f:
        results = json.load(f)
    assert set(results) == {"cls", "gen"}
    for entry in results.values():
        assert {"accuracy", "macro_f1"} <= set(entry["metrics"]) and len(entry["samples"]) == 5
        assert {"prediction", "target"} <= set(entry["samples"][0])
    first = results["cls"]["samples"][0]  # an SFT checkpoint: labels are scored as chat replies
    ctx, cont = answer_pair(load_tokenizer(tokenizer_file), first["prompt"], "love", chat=True, end_of_answer=True)
    assert first["scores"]["love"] == pytest.approx(direct_logprob(tiny_model(5), ctx, cont), abs=1e-4)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "label": "x"}, {"prompt": "q", "label": ""}])
    assert eval_main([f"checkpoint={run}", f"tasks={bad}"]) == 2
    assert 'bad.jsonl:2: "label" must be a non-empty string' in capsys.readouterr().err
    assert eval_main([f"checkpoint={run}", f"tasks={tasks['pair']}", f"judge={run}"]) == 2
    assert "not a reward model" in capsys.readouterr().err  # an LM checkpoint cannot judge


def test_reward_model_judge_scores_like_the_rm_stage(tasks, tokenizer_file, tmp_path):
    """judge=<reward-model run>: pairwise accuracy from the scalar head at each chat-encoded response's last token,
    equal to scoring the same sequences with igpt.stages.rm.score directly."""
    from igpt.data.chat import encode_chat
    from igpt.eval import load_scorer, pairwise_accuracy
    from igpt.stages.rm import score

    torch.manual_seed(7)
    rm = Transformer(ModelConfig(**CFG), head="scalar").eval()
    run = str(tmp_path / "rm")
    write_checkpoint(run, rm, tokenizer_file, stage="rm")
    records = [json.loads(line) for line in open(tasks["pair"], encoding="utf-8")]
    scorer = load_scorer(run, batch_size=2)  # batches of 2 with padding: the same numbers as one at a time
    metrics, rows = pairwise_accuracy(scorer, [r["prompt"] for r in records], [r["chosen"] for r in records],
                                      [r["rejected"] for r in records])
    tok = load_tokenizer(tokenizer_file)
    for r, row in zip(records, rows):
        for key in ("chosen", "rejected"):
            ids = torch.tensor([encode_chat(tok, [{"role": "user", "content": r["prompt"]},
                                                  {"role": "assistant", "content": r[key]}])[0]])
            want = score(rm, ids, torch.ones_like(ids, dtype=torch.bool)).item()
            assert row[f"reward_{key}"] == pytest.approx(want, abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(sum(row["win"] for row in rows) / len(rows))


def test_trainer_scores_eval_tasks_at_every_eval(tasks, prepared_sft_dir, tmp_path):
    """trainer.eval_tasks: each eval logs eval/<task>/<metric> into the val record, the numbers run_tasks gives for
    the checkpoint saved at that step."""
    from igpt.checkpoint import load_model
    from igpt.eval import run_tasks
    from tests.conftest import TINY
    from tests.trainutil import read_metrics, train

    run = str(tmp_path / "sft")
    train(["+stage=sft", f"data.dir={prepared_sft_dir}", f"run_dir={run}", *TINY, "trainer.max_steps=2",
           "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.eval_every=2",
           "trainer.eval_batches=1", "trainer.progress=false", "trainer.sample_every_eval=false",
           "logger.wandb.mode=disabled", "data.num_partitions=2", f"trainer.eval_tasks=[{tasks['cls']}]"])
    val = read_metrics(run, "val")[2]
    model, tok, _ = load_model(run)
    want = run_tasks(model, tok, [tasks["cls"]], chat=True)["cls"]
    assert {"eval/cls/accuracy", "eval/cls/macro_f1", "eval/cls/loss"} <= set(val)
    for key, value in want.items():
        assert val[f"eval/cls/{key}"] == pytest.approx(value, abs=1e-6), key
