"""Tests for igpt.data.chat (template, SFT loss mask) and the record formats of igpt.data.formats."""

import os

import pytest

from igpt.data.chat import (
    ASSISTANT,
    IM_END,
    IM_START,
    encode_chat,
    encode_prompt,
    encode_text,
    render_chat,
    validate_messages,
)
from igpt.data.formats import load_record, parse_pref_record, parse_sft_record
from igpt.data.tokenizer import train_tokenizer

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "sample.txt")

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
MULTI = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Say <|im_end|> literally"},
    {"role": "assistant", "content": "<|im_end|> — done, café 日本."},
]
SYSTEM = [{"role": "system", "content": "You are Juliet."}, *MULTI]
EMPTY_REPLY = [{"role": "user", "content": "Be silent."}, {"role": "assistant", "content": ""}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(SAMPLE, vocab_size=350, progress=False)


def _masked_spans(ids, mask):
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("messages", [SINGLE, MULTI, SYSTEM, EMPTY_REPLY], ids=["single", "multi", "system", "empty"])
def test_mask_is_exactly_on_assistant_content_and_im_end(tok, messages):
    ids, mask = encode_chat(tok, messages)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    spans = [tok.decode(s, skip_special_tokens=False) for s in _masked_spans(ids, mask)]
    assert spans == [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    # the whole sequence is the documented template
    assert tok.decode(ids, skip_special_tokens=False) == render_chat(messages)
    assert ids[0] == tok.token_to_id("<|endoftext|>") and mask[0] == 0


def test_template_layout(tok):
    ids, mask = encode_chat(tok, SINGLE)
    sp = {s: tok.token_to_id(s) for s in ("<|endoftext|>", IM_START, IM_END, "<|user|>", ASSISTANT)}
    q, a = encode_text(tok, SINGLE[0]["content"]), encode_text(tok, SINGLE[1]["content"])
    expected = [
        sp["<|endoftext|>"],
        sp[IM_START],
        sp["<|user|>"],
        *q,
        sp[IM_END],
        sp[IM_START],
        sp[ASSISTANT],
        *a,
        sp[IM_END],
    ]
    assert ids == expected
    assert mask == [0] * (4 + len(q)) + [0, 0] + [1] * (len(a) + 1)
    assert (
        render_chat(SINGLE) == "<|endoftext|><|im_start|><|user|>What is 2+2?<|im_end|>"
        "<|im_start|><|assistant|>It is 4.<|im_end|>"
    )


def test_literal_special_strings_in_content_stay_text(tok):
    ids, _ = encode_chat(tok, MULTI)
    im_end = tok.token_to_id(IM_END)
    assert ids.count(im_end) == len(MULTI)  # one per turn, none from the content's "<|im_end|>"


def test_generation_prompt(tok):
    ids, mask = encode_chat(tok, SINGLE[:1], add_generation_prompt=True)
    assert ids[-2:] == [tok.token_to_id(IM_START), tok.token_to_id(ASSISTANT)] and sum(mask) == 0
    assert encode_prompt(tok, "What is 2+2?") == ids
    assert encode_prompt(tok, SINGLE) == encode_chat(tok, SINGLE)[0] + ids[-2:]
    assert render_chat(SINGLE[:1], add_generation_prompt=True) == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([["user", "hi"]], r"\[0\]: expected a dict"),
        ([{"role": "user"}], r"\[0\]: missing key 'content'"),
        ([{"content": "x"}], r"\[0\]: missing key 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"\[1\]: role str 'bot' is not one of"),
        ([{"role": "user", "content": 5}], r"\[0\]: content must be a string, got int 5"),
    ],
)
def test_validation_errors_say_what_is_wrong(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        encode_chat(tok, messages)
    with pytest.raises(ValueError, match=error):
        validate_messages(messages)


def test_alpaca_conversion():
    with_input = parse_sft_record({"instruction": "Translate", "input": "cheese", "output": "fromage"}, "f:1")
    assert with_input == [
        {"role": "user", "content": "Translate\n\ncheese"},
        {"role": "assistant", "content": "fromage"},
    ]
    for record in ({"instruction": "Hi", "input": "", "output": "Hello"}, {"instruction": "Hi", "output": "Hello"}):
        assert parse_sft_record(record, "f:2") == [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    assert parse_sft_record({"messages": SYSTEM, "id": 3}, "f:3") == SYSTEM


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"messages": [', r"data.jsonl:7: invalid JSON"),
        ("[1, 2]", r"data.jsonl:7: expected a JSON object, got list"),
        ('{"text": "hi"}', r"data.jsonl:7: expected a 'messages' list, ShareGPT 'conversations'"),
        ('{"instruction": "hi"}', r"data.jsonl:7: missing key 'output'"),
        ('{"instruction": "hi", "output": 3}', r"data.jsonl:7: 'output' must be a string, got int"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"data.jsonl:7: messages\[0\]: role str 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"data.jsonl:7: no assistant message"),
    ],
)
def test_sft_record_errors_name_file_and_line(line, error):
    with pytest.raises(ValueError, match=error):
        parse_sft_record(load_record(line, "data.jsonl:7"), "data.jsonl:7")


def test_pref_record_forms_and_errors():
    rec = parse_pref_record({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": 2}, "p:1")
    assert rec.prompt == [{"role": "user", "content": "Q?"}]
    assert rec.responses == [[{"role": "assistant", "content": "A."}], [{"role": "assistant", "content": "B."}]]
    assert rec.ranking == [0, 1] and rec.margin == 2.0
    record = {"messages": SINGLE[:1], "chosen": [SINGLE[1]], "rejected": [{"role": "assistant", "content": "5"}]}
    assert parse_pref_record(record, "p:2").responses[0] == [SINGLE[1]]
    kwise = parse_pref_record({"prompt": "Q?", "responses": ["a", "b", "c"], "ranking": [2, 0, 2]}, "p:3")
    assert kwise.ranking == [2, 0, 2] and kwise.margin == 0.0 and len(kwise.responses) == 3
    errors = [
        ({"chosen": "a", "rejected": "b"}, "p:9: missing key 'prompt'"),
        ({"prompt": "q", "chosen": "a"}, "p:9: missing key 'rejected'"),
        ({"prompt": "q", "chosen": 1, "rejected": "b"}, "p:9: 'chosen' must be a string or a list of messages"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "p:9: chosen has no"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "p:9: 'margin' must be a number"),
        ({"prompt": "q", "responses": ["a"], "ranking": [0]}, "p:9: expected at least 2 responses"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0]}, "p:9: expected at least 2 responses and one rank"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]}, "p:9: every response has the same rank"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, -1]}, r"p:9: ranking must hold integers >= 0"),
        ({"prompt": "q", "responses": ["a", "b"]}, "p:9: a K-wise record needs 'ranking'"),
        ({"prompt": "q", "responses": ["a", 3], "ranking": [0, 1]}, r"p:9: 'responses\[1\]' must be a string"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "margin": 1}, "p:9: 'margin' applies to"),
    ]
    for record, error in errors:
        with pytest.raises(ValueError, match=error):
            parse_pref_record(record, "p:9")


def test_prompt_record_forms_and_errors():
    from igpt.data.formats import parse_prompt_record

    assert parse_prompt_record({"prompt": "Hi?", "answer": "4"}, "q:1") == [{"role": "user", "content": "Hi?"}]
    assert parse_prompt_record({"messages": SINGLE[:1]}, "q:2") == SINGLE[:1]
    with pytest.raises(ValueError, match="q:3: the prompt ends with a assistant turn"):
        parse_prompt_record({"messages": SINGLE}, "q:3")
    with pytest.raises(ValueError, match="q:4: missing key 'prompt'"):
        parse_prompt_record({"question": "x"}, "q:4")
