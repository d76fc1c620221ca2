"""Corpus preparation (documents, NFC, dedup, per-source val split, memmaps, meta.json) and the sampler."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from kogpt.cli import main
from kogpt.cli.prepare import parse_weights
from kogpt.data.corpus import (DataError, Deduper, chars_per_token, find_sources, read_documents, scan, split_documents,
                          write_training_text)
from kogpt.data.tokens import BatchSampler, load_tokens, prepare, read_meta, token_dtype
from kogpt.errors import UserError

from conftest import ROOT, shared_path

DUP = "이 영화는 정말 최고의 영화입니다 다시 보고 싶어요"  # a review that occurs three times
TITLE = "역사."  # a short section title repeated inside articles: kept


def make_corpus(root: Path) -> dict[str, Path]:
    """A small two-source corpus from real files: wiki articles (blank-line separated) and reviews
    (one per line), with an NFD line, a thrice-repeated review and a repeated section title."""
    wiki_lines = shared_path("corpus", "kowiki", "kowiki_sample.txt").read_text(encoding="utf-8").splitlines()[:400]
    reviews = shared_path("corpus", "movie_reviews", "naver_movie_reviews_nonbench.txt").read_text(
        encoding="utf-8").splitlines()[:300]
    (root / "wiki").mkdir(parents=True)
    (root / "reviews").mkdir()
    extra = f"\n\n첫 문서.\n{TITLE}\n{unicodedata.normalize('NFD', '한글 자모 분해 문장입니다.')}\n\n둘째 문서.\n{TITLE}\n끝.\n"
    (root / "wiki" / "wiki.txt").write_text("\n".join(wiki_lines) + extra, encoding="utf-8")
    (root / "reviews" / "reviews.txt").write_text("\n".join([*reviews, DUP, DUP, DUP]) + "\n",
                                                  encoding="utf-8")
    return {"wiki": root / "wiki" / "wiki.txt", "reviews": root / "reviews" / "reviews.txt"}


def split_at(ids: list[int], sep: int) -> list[list[int]]:
    out = [[]]
    for i in ids:
        out.append([]) if i == sep else out[-1].append(i)
    return out


def make_tokenizer(files, out: Path, vocab_size: int = 1000):
    from kogpt.text.bpe import train_tokenizer

    tok = train_tokenizer([str(f) for f in files], vocab_size, show_progress=False)
    tok.save(out)
    return tok


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root)
    return root


@pytest.fixture(scope="session")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(sorted(corpus.rglob("*.txt")), out)
    return out


@pytest.fixture(scope="session")
def data_dir(corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare([str(corpus)], tok_dir, out, val_fraction=0.05, num_workers=1, show_progress=False)
    return out


def test_prepare_layout_dtype_and_counts(data_dir):
    meta = read_meta(data_dir)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 1000
    assert [s["name"] for s in meta["sources"]] == ["reviews", "wiki"]  # one source per sub-folder
    assert (data_dir / "tokenizer" / "tokenizer.json").exists()
    for split in ("train", "val"):
        tokens = load_tokens(data_dir, split, meta)
        assert tokens.dtype == np.uint16 and (data_dir / f"{split}.bin").stat().st_size == 2 * len(tokens)
        s = meta["splits"][split]
        assert len(tokens) == s["tokens"] == sum(src[split]["tokens"] for src in meta["sources"])
        assert int((tokens == meta["tokenizer"]["eos_id"]).sum()) == s["docs"]  # one EOS per document
        assert tokens[-1] == meta["tokenizer"]["eos_id"]
        assert s["bytes"] > s["chars"] > s["tokens"] / 2  # Hangul: 3 bytes a character
    by_name = {s["name"]: s for s in meta["sources"]}
    assert by_name["reviews"]["one_doc_per_line"] and not by_name["wiki"]["one_doc_per_line"]
    assert by_name["reviews"]["train"]["docs"] + by_name["reviews"]["val"]["docs"] == 301  # 300 + DUP once


def test_every_source_holds_out_val_documents(data_dir):
    meta = read_meta(data_dir)
    for s in meta["sources"]:
        n = s["train"]["docs"] + s["val"]["docs"]
        assert s["val"]["docs"] == max(1, n // 20), s["name"]  # val_fraction 0.05: every 20th document
        assert s["val"]["start"] + s["val"]["tokens"] <= meta["splits"]["val"]["tokens"]


def test_documents_round_trip_in_nfc_with_eos_between(data_dir, corpus):
    from kogpt.text.tokenizer import Tokenizer

    meta, tok = read_meta(data_dir), Tokenizer.from_dir(data_dir / "tokenizer")
    wiki = next(s for s in meta["sources"] if s["name"] == "wiki")
    docs = {}
    for split in ("train", "val"):
        tokens, s = load_tokens(data_dir, split, meta), wiki[split]
        ids = tokens[s["start"]:s["start"] + s["tokens"]].tolist()
        assert ids[-1] == tok.eos_id  # the source ends with an EOS
        docs[split] = [tok.decode(d) for d in split_at(ids[:-1], tok.eos_id)]
    first = (corpus / "wiki" / "wiki.txt").read_text(encoding="utf-8").split("\n\n")[0]
    assert docs["train"][0] == first  # the first article, its paragraphs joined by newlines
    assert docs["val"] == ["둘째 문서.\n역사.\n끝."]  # the last document; its short title is kept
    assert "첫 문서.\n역사.\n한글 자모 분해 문장입니다." in docs["train"]  # NFD input became NFC


def test_duplicate_lines_are_dropped(data_dir):
    from kogpt.text.tokenizer import Tokenizer

    meta, tok = read_meta(data_dir), Tokenizer.from_dir(data_dir / "tokenizer")
    reviews = next(s for s in meta["sources"] if s["name"] == "reviews")
    assert reviews["duplicate_lines_dropped"] == 2
    text = "".join(tok.decode(load_tokens(data_dir, split, meta)[reviews[split]["start"]:][:reviews[split]["tokens"]]
                              .tolist()) for split in ("train", "val"))
    assert text.count(DUP) == 1


def test_parallel_tokenization_writes_the_same_bytes(corpus, tok_dir, data_dir, tmp_path):
    prepare([str(corpus)], tok_dir, tmp_path, val_fraction=0.05, num_workers=2, show_progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes()
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads((data_dir / "meta.json").read_text())


def test_named_sources_weights_and_chatbot_csv(corpus, tok_dir, tmp_path):
    csv_path = shared_path("corpus", "chatbot", "ChatbotData.csv")
    meta = prepare([f"news={corpus / 'wiki'}", f"chat={csv_path}"], tok_dir, tmp_path, val_fraction=0.01,
                   weights={"chat": 0.5}, num_workers=1, show_progress=False)
    assert [(s["name"], s["weight"]) for s in meta["sources"]] == [("news", 1.0), ("chat", 0.5)]
    chat = meta["sources"][1]
    assert 11_000 < chat["train"]["docs"] + chat["val"]["docs"] <= 11_823  # a Q/A pair per row, duplicates dropped
    with pytest.raises(DataError, match="unknown source 'chatt'"):
        prepare([f"chat={csv_path}"], tok_dir, tmp_path, weights={"chatt": 1}, show_progress=False)


def test_bad_corpora_fail_before_tokenizing(tok_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare([str(tmp_path / "empty.txt")], tok_dir, tmp_path / "out", show_progress=False)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        prepare([str(tmp_path / "latin1.txt")], tok_dir, tmp_path / "out", show_progress=False)
    with pytest.raises(DataError, match="input not found"):
        find_sources([str(tmp_path / "missing*.txt")])
    assert not (tmp_path / "out" / "meta.json").exists()


def test_token_dtype_follows_vocab_size():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_split_documents_holds_out_a_slice_of_small_sources():
    assert [s for s, _ in split_documents(map(str, range(10)), 0.25)] == ["train"] * 3 + ["val"] + ["train"] * 3 + ["val"] + ["train"] * 2
    assert [s for s, _ in split_documents(["a", "b", "c"], 0.01)] == ["train", "train", "val"]
    assert [s for s, _ in split_documents(["a"], 0.01)] == ["train"]


def test_deduper_keeps_short_lines_inside_documents():
    d = Deduper(min_chars=5)
    assert d(["제목", "긴 문장 하나입니다"]) == ["제목", "긴 문장 하나입니다"]
    assert d(["제목", "긴 문장 하나입니다", "새 문장 하나입니다"]) == ["제목", "새 문장 하나입니다"]
    assert d(["제목"]) == ["제목"] and d(["제목"]) == [] and d.dropped == 2  # one-line documents always dedup


def test_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, [(0, 600), (600, 400)], [1.0, 1.0], seq_len=16, seed=3)
    a, src = s.starts(7, 64)
    assert np.array_equal(a, s.starts(7, 64)[0]) and not np.array_equal(a, s.starts(8, 64)[0])
    assert np.array_equal(a, BatchSampler(tokens, [(0, 600), (600, 400)], [1.0, 1.0], 16, seed=3).starts(7, 64)[0])
    assert ((a >= 0) & (a + 17 <= np.where(src == 0, 600, 1000))).all()  # windows stay inside their source
    rows = s.read(a[:4])
    assert rows.shape == (4, 17) and (rows[:, 1:] - rows[:, :-1] == 1).all()
    only_second = BatchSampler(tokens, [(0, 600), (600, 400)], [0.0, 1.0], 16, seed=3).starts(0, 200)
    assert (only_second[1] == 1).all() and (only_second[0] >= 600).all()
    heavy = BatchSampler(tokens, [(0, 600), (600, 400)], [1.0, 6.0], 16, seed=3).starts(0, 4000)[1]
    assert 0.75 < heavy.mean() < 0.85  # 6 × 400 / (600 + 6 × 400) = 0.8


def test_sampler_rejects_data_shorter_than_a_window():
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(np.zeros(10, np.uint16), [(0, 10)], [1.0], seq_len=16, seed=0)


def test_chars_per_token(tok_dir):
    from kogpt.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    text = "대한민국은 민주공화국이다."
    assert chars_per_token(tok, [text]) == pytest.approx(len(text) / len(tok.encode(text)))


# -- re-prepare, CSV limits, weights, train-tokenizer, layering -----------------------------------
def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_reprepare_keeps_the_previous_data(corpus, tok_dir, data_dir, tmp_path, monkeypatch, failure):
    import kogpt.data.tokens

    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    before = files_of(out)
    calls = []

    def encode_then_fail(texts):  # the second tokenization task fails: train.bin is half written
        calls.append(len(texts))
        if len(calls) == 2:
            raise failure
        return real(texts)

    real = kogpt.data.tokens._encode
    monkeypatch.setattr(kogpt.data.tokens, "_encode", encode_then_fail)
    with pytest.raises(type(failure)):
        prepare([str(corpus)], tok_dir, out, val_fraction=0.1, num_workers=1, show_progress=False)
    assert len(calls) == 2 and files_of(out) == before  # the previous data, whole; no temp files
    meta = read_meta(out)
    assert load_tokens(out, "train", meta).shape[0] == meta["splits"]["train"]["tokens"]

    monkeypatch.setattr(kogpt.data.tokens, "_encode", real)
    new = prepare([str(corpus)], tok_dir, out, val_fraction=0.1, num_workers=1, show_progress=False)
    assert read_meta(out) == new and new["val_fraction"] == 0.1 and new != meta
    for split in ("train", "val"):
        assert load_tokens(out, split, new).shape[0] == new["splits"][split]["tokens"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]


def test_csv_fields_past_the_csv_module_limit(tmp_path, monkeypatch):
    import kogpt.data.corpus
    from kogpt.evaluation.perplexity import read_documents as eval_documents

    long = "가나다라마바사 " * 30_000  # 240k characters: past Python's default 131,072 per field
    path = tmp_path / "long.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["Q", "A"], ["질문", long], ["둘째", "답"]])
    info = scan(path)
    assert [units for units, _ in read_documents(info)] == [[f"질문\n{long.strip()}"], ["둘째\n답"]]
    assert eval_documents(path)[0] == f"질문\n{long.strip()}"

    old = csv.field_size_limit(1000)  # a field past whatever limit holds: DataError naming file:line
    monkeypatch.setattr(kogpt.data.corpus, "_CSV_FIELD_LIMIT", 1000)
    try:
        with pytest.raises(DataError, match=r"long\.csv:2: unreadable CSV \(field larger than field limit"):
            scan(path)
    finally:
        csv.field_size_limit(old)


def test_weights_must_be_finite_and_not_all_zero(corpus, tok_dir, tmp_path):
    assert parse_weights(["wiki=2", "reviews=0"]) == {"wiki": 2.0, "reviews": 0.0}
    for spec in ("wiki=inf", "wiki=nan", "wiki=-1", "wiki=-inf", "=2", "wiki"):
        with pytest.raises(UserError):
            parse_weights([spec])
    with pytest.raises(DataError, match="every source has weight 0"):
        prepare([str(corpus)], tok_dir, tmp_path, weights={"wiki": 0, "reviews": 0}, show_progress=False)
    with pytest.raises(DataError, match="'wiki' must be a finite number"):
        prepare([str(corpus)], tok_dir, tmp_path, weights={"wiki": float("inf")}, show_progress=False)
    with pytest.raises(DataError, match="'wiki' must be a finite number"):
        BatchSampler.from_dir(tmp_path, "train", 16, 0, {"wiki": float("nan")},
                              {"sources": [{"name": "wiki", "weight": 1.0}]})
    assert not list(tmp_path.iterdir())  # refused before anything was written


def one_line_error(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_train_tokenizer_flags_are_checked_before_reading(corpus, tmp_path, capsys):
    base = ["train-tokenizer", "--input", str(corpus), "--out", str(tmp_path / "tok"), "--no-progress"]
    one_line_error(capsys, [*base, "--vocab-size", "100"], "--vocab-size must be in [", "got 100")
    one_line_error(capsys, [*base, "--min-frequency", "-1"], "--min-frequency must be in [0,")
    for f in ("0", "5", "nan", "-0.1"):
        one_line_error(capsys, [*base, "--val-fraction", f], "--val-fraction must be in (0, 0.5]")
    one_line_error(capsys, [*base, "--dedup-min-chars", "-1"], "--dedup-min-chars must be >= 0")
    one_line_error(capsys, [*base, "--sample-mb", "-1"], "--sample-mb must be")
    one_line_error(capsys, [*base, "--sample-mb", "1e-9"], "no documents to train on", "--sample-mb")
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, [*base[:-3], "--out", str(tmp_path / "file")], "--out", "is a file")
    assert not (tmp_path / "tok").exists()


def test_prepare_flags_are_checked_before_reading(corpus, tok_dir, tmp_path, capsys):
    base = ["prepare", "--input", str(corpus), "--tokenizer", str(tok_dir), "--no-progress"]
    one_line_error(capsys, [*base, "--out", str(tmp_path / "d"), "--val-fraction", "nan"], "--val-fraction")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "d"), "--dedup-min-chars", "-1"], "--dedup-min-chars")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "d"), "--weight", "wiki=inf"], "finite")
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "file")], "--out", "is a file")
    assert not (tmp_path / "d").exists()


def test_prepare_takes_a_bundled_models_tokenizer_by_name(corpus, tmp_path, capsys):
    """Continued pretraining of kogpt-mini (`kogpt train --init-from kogpt-mini`) needs its tokenizer."""
    from kogpt.hf.hub import BUNDLED
    from kogpt.text.tokenizer import Tokenizer

    assert main(["prepare", "--input", str(corpus), "--tokenizer", "kogpt-mini", "--out", str(tmp_path / "d"),
                 "--num-workers", "1", "--no-progress"]) == 0
    assert read_meta(tmp_path / "d")["tokenizer"]["hash"] == Tokenizer.from_dir(BUNDLED / "kogpt-mini").hash()
    one_line_error(capsys, ["prepare", "--input", str(corpus), "--tokenizer", "kogpt-nano", "--out",
                            str(tmp_path / "e"), "--no-progress"], "kogpt-nano")


def val_and_train_documents(data: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The documents of a prepared folder, decoded: {source: val documents}, and all training documents."""
    from kogpt.text.tokenizer import Tokenizer

    meta, tok = read_meta(data), Tokenizer.from_dir(data / "tokenizer")
    docs: dict = {"train": [], "val": {}}
    for src in meta["sources"]:
        for split in ("train", "val"):
            s = src[split]
            ids = load_tokens(data, split, meta)[s["start"]:s["start"] + s["tokens"]].tolist()
            texts = [tok.decode(d) for d in split_at(ids[:-1], tok.eos_id)] if ids else []
            if split == "train":
                docs["train"] += texts
            else:
                docs["val"][src["name"]] = texts
    return docs["val"], docs["train"]


def test_train_tokenizer_holds_out_what_prepare_holds_out(corpus, tok_dir, tmp_path, capsys, monkeypatch):
    import kogpt.data.corpus

    prepare([str(corpus)], tok_dir, tmp_path / "d", val_fraction=0.05, dedup_min_chars=2, num_workers=1,
            show_progress=False)
    val, train_docs = val_and_train_documents(tmp_path / "d")
    assert "둘째 문서.\n끝." in val["wiki"]  # with dedup_min_chars 2 the repeated short title is dropped
    sources = find_sources([str(corpus)])
    infos = {p: scan(p) for s in sources for p in s.files}
    written, held_out = write_training_text(sources, infos, tmp_path / "t.txt", val_fraction=0.05, dedup_min_chars=2)
    assert held_out == val and written == len(train_docs)
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "".join(d + "\n" for d in train_docs)

    seen = []  # the command passes its flags through

    def spy(*args, **kw):
        seen.append((kw["val_fraction"], kw["dedup_min_chars"]))
        return write_training_text(*args, **kw)

    monkeypatch.setattr(kogpt.data.corpus, "write_training_text", spy)
    assert main(["train-tokenizer", "--input", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "1000",
                 "--val-fraction", "0.05", "--dedup-min-chars", "2", "--no-progress"]) == 0
    assert seen == [(0.05, 2)] and "wiki" in capsys.readouterr().out


def test_the_data_pipeline_does_not_import_torch(tok_dir):
    code = ("import sys, kogpt.data.tokens, kogpt.fileio, kogpt.training.run_log, kogpt.training.config; "
            f"kogpt.data.tokens._init_worker({str(tok_dir)!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
