"""Tests for igpt.data.tokenizer: training, exact round trips, special-token ids, loading, byte lengths."""

import os

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from igpt.data.chat import SPECIAL_TOKENS, encode_chat, encode_text
from igpt.data.tokenizer import load_tokenizer, main, token_bytes, train_tokenizer, vocab_size

DATA = os.path.join(os.path.dirname(__file__), "data")
SAMPLE = os.path.join(DATA, "sample.txt")

TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "café naïve Æsop Straße Ωμέγα Привет 日本語 😀🚀 e\u0301 \u200b zero-width",
    "tabs\tand\r\nwindows\rline ends\n\n\n",
    "rare bytes \x00\x01\x7f and ÿ",
    "<|im_end|> looks special but is text <|endoftext|>",
    "ROMEO: But, soft! what light through yonder window breaks?",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(SAMPLE, vocab_size=400, output=path, progress=False)
    return path


def test_special_tokens_have_ids_0_to_6(tok_path):
    tok = load_tokenizer(tok_path)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert 263 < vocab_size(tok) <= 400


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok_path, text):
    tok = load_tokenizer(tok_path)
    ids = encode_text(tok, text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert not set(ids) & set(range(7)), "special-token strings inside text must stay text"


def test_training_learns_merges(tok_path):
    tok = load_tokenizer(tok_path)
    text = "Romeo, Romeo! wherefore art thou Romeo?"
    assert len(encode_text(tok, text)) < len(text.encode("utf-8")) * 0.8


def test_cli_trains_and_rejects_unknown_keys(tmp_path, capsys):
    out = tmp_path / "t.json"
    main([f"input={DATA}/*.txt", "vocab_size=300", f"output={out}", "progress=false"])
    tok = load_tokenizer(str(out))
    assert vocab_size(tok) <= 300 and tok.token_to_id("<|assistant|>") == 6
    with pytest.raises(SystemExit, match="unknown key 'vocab'"):
        main([f"input={SAMPLE}", "vocab=300", f"output={out}"])
    with pytest.raises(SystemExit, match="missing output=<value>"):
        main([f"input={SAMPLE}", "vocab_size=300"])
    with pytest.raises(SystemExit, match="vocab_size='many': expected int"):
        main([f"input={SAMPLE}", "vocab_size=many", f"output={out}"])


def test_vocab_too_small_and_empty_input(tmp_path):
    with pytest.raises(ValueError, match="at least 263"):
        train_tokenizer(SAMPLE, vocab_size=100, progress=False)
    with pytest.raises(ValueError, match="no files match"):
        train_tokenizer(str(tmp_path / "nothing*.txt"), vocab_size=300, progress=False)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="hold no text"):
        train_tokenizer(str(tmp_path / "blank.txt"), vocab_size=300, progress=False)


def test_invalid_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text then \xff\xfe bad")
    with pytest.raises(ValueError, match=rf"{bad}: invalid utf-8 at byte offset 15"):
        train_tokenizer(str(bad), vocab_size=300, progress=False)
    tok = train_tokenizer(str(bad), vocab_size=300, encoding="latin-1", progress=False)
    assert tok.decode(encode_text(tok, "ÿþ")) == "ÿþ"


def _user_tokenizer(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([SAMPLE], trainer)
    return tok


def test_user_tokenizer_lacking_specials_gets_igpt_template_tokens(tmp_path):
    """igpt's special tokens are not required: a tokenizer without a chat template gets the template tokens it lacks,
    after its vocabulary; documents start with its <|endoftext|>."""
    from igpt.data.chat import TEMPLATE_TOKENS, ChatFormat

    path = tmp_path / "user.json"
    _user_tokenizer(["<|endoftext|>", "<|im_start|>"]).save(str(path))
    fmt = ChatFormat.load(str(path))
    n = vocab_size(fmt.tokenizer)
    assert fmt.encode_document("hi")[0] == fmt.token_to_id("<|endoftext|>") == 0
    with pytest.raises(ValueError, match=r"lacks the special tokens <\|im_end\|>, <\|system\|>"):
        fmt.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    chat = fmt.with_chat_tokens()
    assert chat.token_to_id("<|im_start|>") == 1  # kept where it was
    assert sorted(chat.token_to_id(t) for t in TEMPLATE_TOKENS[1:]) == list(range(n, n + 4))
    ids, mask = chat.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids[0] == 0 and sum(mask) == len(encode_text(chat, "yo")) + 1
    assert chat.stop_ids == [chat.token_to_id("<|im_end|>"), 0] and chat.pad_id == 0


def test_user_tokenizer_with_specials_elsewhere_works(tmp_path):
    tok = _user_tokenizer(["<unk>"])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))  # a folder holding tokenizer.json
    ids, mask = encode_chat(loaded, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids[0] == loaded.token_to_id("<|endoftext|>") != 0
    assert sum(mask) == len(encode_text(loaded, "yo")) + 1


def test_token_bytes_sum_to_utf8_length(tok_path):
    tok = load_tokenizer(tok_path)
    tb = token_bytes(tok)
    assert tb.shape == (vocab_size(tok),) and tb.dtype.is_floating_point is False
    assert tb[:7].tolist() == [0] * 7
    assert int(tb[7:].min()) >= 1
    for text in TEXTS:
        ids = encode_text(tok, text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    ids, _ = encode_chat(tok, [{"role": "user", "content": "café"}, {"role": "assistant", "content": "日本"}])
    assert int(tb[ids].sum()) == len("café日本".encode())
