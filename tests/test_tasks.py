"""Task loaders on the real benchmark files and on broken ones, the versioned prompts, predictions."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from conftest import shared_path
from kogpt.errors import UserError
from kogpt.evaluation.tasks import TASKS, Example, get_task
from kogpt.evaluation.tasks.base import read_json_list

NSMC_HEADER = "id\tdocument\tlabel\n"
YNAT_HEADER = "guid\ttitle\tlabel\tlabel_text\tlabel_source\n"
KORSTS_HEADER = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"


# -- the real files (row counts as DATA.md states) --------------------------------------------------
def test_nsmc_train_keeps_every_row_quotes_and_empty_documents():
    ex = get_task("nsmc").load(shared_path("bench", "nsmc", "ratings_train.txt"))
    assert len(ex) == 150_000
    assert Counter(e.label for e in ex) == {0: 75_173, 1: 74_827}
    assert sum(e.text == "" for e in ex) == 5  # kept, so n equals the file's rows
    quoted = next(e for e in ex if e.id == "10122280")  # quoting off: quotes are text
    assert quoted.text.startswith('"""영화 끝나갈때쯤에') and quoted.text.endswith('ㅈ같다."""""""')


def test_ynat_train_drops_only_unlabelled_rows():
    ex = get_task("ynat").load(shared_path("bench", "klue_ynat", "ynat-v1.1_train.tsv"))
    assert len(ex) == 45_678 - 747
    counts = Counter(e.label for e in ex)
    assert set(counts) == set(range(7)) and counts[4] == 8_200  # 세계
    assert ex[0].id == "ynat-v1_train_00000" and ex[0].text == "유튜브 내달 2일까지 크리에이터 지원 공간 운영"


@pytest.mark.parametrize("name,rows", [("sts-train.tsv", 5_749), ("sts-dev.tsv", 1_500)])
def test_korsts_files(name, rows):
    ex = get_task("korsts").load(shared_path("bench", "korsts", name))
    assert len(ex) == rows
    assert all(0 <= e.score <= 5 and e.label == (e.score >= 3) and e.text and e.text_pair for e in ex)
    assert len({e.id for e in ex}) == rows  # genre/filename/year/id is unique


def test_klue_sts_sample():
    path = shared_path("bench", "klue_sts", "klue-sts-v1.1_dev.sample.json")
    ex = get_task("klue-sts").load(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(ex) == 20 and [e.id for e in ex] == [r["guid"] for r in raw]
    assert [e.label for e in ex] == [r["labels"]["binary-label"] for r in raw]
    assert ex[0].score == 4.9 and ex[0].text_pair == "무엇보다도, 호스트들은 매우 친절했습니다."
    assert all(e.label == (e.score >= 3) for e in ex)  # the binary threshold KorSTS shots use too
    assert ex[1].where == f"{path}:34"  # the line where the entry starts


# -- malformed input: one UserError naming file:line -------------------------------------------
@pytest.mark.parametrize("task,content,line,msg", [
    ("nsmc", NSMC_HEADER + "1\t좋아요\t1\n2\t별로\n", 3, "expected 3 tab-separated fields"),
    ("nsmc", NSMC_HEADER + "1\t좋아요\t1\n2\t별로\t2\n", 3, "label must be one of 0, 1, found '2'"),
    ("nsmc", NSMC_HEADER + "1\t좋아요\t1\n\n", 3, "found 1"),  # a blank line is a malformed row too
    ("nsmc", "id\ttext\tlabel\n1\t좋아요\t1\n", 1, "expected the header"),
    ("nsmc", YNAT_HEADER + "a\t제목\t0\tIT과학\tx\n", 1, "expected the header"),  # the wrong task's file
    ("ynat", YNAT_HEADER + "a\t제목\t0\tIT과학\tx\nb\t제목\t1\t스포츠\tx\n", 3, "label 1 is 경제, but label_text"),
    ("ynat", YNAT_HEADER + "a\t제목\t7\t?\tx\n", 2, "label must be one of -1, 0, 1"),
    ("korsts", KORSTS_HEADER + "g\tf\ty\t1\t5.5\t가\t나\n", 2, "score must be a number in [0, 5], found '5.5'"),
    ("korsts", KORSTS_HEADER + "g\tf\ty\t1\tabc\t가\t나\n", 2, "score must be a number"),
])
def test_malformed_rows_name_file_and_line(tmp_path, task, content, line, msg):
    path = tmp_path / "data.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        get_task(task).load(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and msg in str(e.value)


def test_non_utf8_and_missing_and_empty_files(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(NSMC_HEADER.encode() + b"1\t\xff\xfe\t1\n")
    with pytest.raises(UserError, match=r"bad.tsv:2: not UTF-8"):
        get_task("nsmc").load(bad)
    with pytest.raises(UserError, match="data file not found"):
        get_task("nsmc").load(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(UserError, match="empty file"):
        get_task("nsmc").load(tmp_path / "empty.tsv")
    (tmp_path / "header.tsv").write_text(NSMC_HEADER)
    with pytest.raises(UserError, match="no examples"):
        get_task("nsmc").load(tmp_path / "header.tsv")


def test_ynat_label_minus_one_is_dropped_and_crlf_is_read(tmp_path):
    path = tmp_path / "ynat.tsv"
    path.write_bytes((YNAT_HEADER + "a\t제목1\t-1\t\tx\nb\t제목2\t5\t스포츠\tx\n").replace("\n", "\r\n").encode())
    [ex] = get_task("ynat").load(path)
    assert (ex.id, ex.text, ex.label, ex.where) == ("b", "제목2", 5, f"{path}:3")


def _sts_entry(guid="g1", **labels):
    return {"guid": guid, "source": "s", "sentence1": "가", "sentence2": "나",
            "labels": {"label": 3.2, "real-label": 3.2, "binary-label": 1, **labels}}


@pytest.mark.parametrize("entries,line,msg", [
    ([_sts_entry(), {"guid": "g2", "sentence1": "가", "sentence2": "나"}], 13, "entry lacks 'labels'"),
    ([_sts_entry(), _sts_entry("g2", **{"binary-label": 2})], 13, "binary-label must be one of 0, 1"),
    ([_sts_entry(label=-1)], 2, "labels.label must be a number in [0, 5]"),
    ([_sts_entry(), "text"], 13, "entry lacks"),
])
def test_klue_sts_malformed_entries_name_the_line(tmp_path, entries, line, msg):
    path = tmp_path / "sts.json"
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    with pytest.raises(UserError) as e:
        get_task("klue-sts").load(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and msg in str(e.value)


@pytest.mark.parametrize("text,msg", [
    ('{"guid": 1}', ":1: expected a JSON list"),
    ('[\n{"a": 1},\n{"a": 2\n]', ":4: invalid JSON"),
    ('[{"a": 1} {"a": 2}]', ":1: invalid JSON (expected ',' or ']'"),
    ('[{"a": 1}]\n[]', ":2: invalid JSON (extra data"),
])
def test_json_list_reader_rejects_broken_json(tmp_path, text, msg):
    path = tmp_path / "x.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}{msg}".replace("(", r"\(").replace("[", r"\[")):
        list(read_json_list(path))


def test_json_list_reader_lines(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[ {"a": 1},\n\n  {"b": "줄\\n바꿈"} ,{"c": 3}\n]\n', encoding="utf-8")
    assert [(w.rsplit(":", 1)[1], e) for w, e in read_json_list(path)] == [
        ("1", {"a": 1}), ("3", {"b": "줄\n바꿈"}), ("3", {"c": 3})]
    path.write_text(" [ ] ")
    assert list(read_json_list(path)) == []


# -- prompts, choices, predictions ---------------------------------------------------------------
def test_prompts_are_the_documented_versions():
    a = Example("1", "재밌어요", 1)
    b = Example("2", "지루함", 0)
    assert TASKS["nsmc"].prompt(b, [a]) == "리뷰: 재밌어요\n감정: 긍정\n\n리뷰: 지루함\n감정:"
    assert TASKS["nsmc"].continuations() == [" 부정", " 긍정"]
    assert TASKS["ynat"].prompt(Example("y", "코스피 상승", 1)) == (
        "다음의 제목을 가지는 뉴스는 어느 분야의 뉴스인가요?\n제목: 코스피 상승\n분야:")
    assert TASKS["ynat"].choices == ("IT과학", "경제", "사회", "생활문화", "세계", "스포츠", "정치")
    pair = Example("s", "비가 온다.", 1, text_pair="비가 내린다.", score=4.2)
    for name in ("klue-sts", "korsts"):
        assert TASKS[name].prompt(pair) == "문장 1: 비가 온다.\n문장 2: 비가 내린다.\n질문: 두 문장의 의미가 비슷한가요?\n답:"
        assert TASKS[name].render(pair, answer=True).endswith("답: 예")
    versions = {t.name: t.prompt_version for t in TASKS.values()}
    assert versions == {"nsmc": "nsmc-v1", "ynat": "ynat-v1", "klue-sts": "sts-v1", "korsts": "sts-v1"}


def test_predict_takes_the_argmax_and_a_renormalized_yes_score():
    nsmc, sts = TASKS["nsmc"], TASKS["korsts"]
    assert nsmc.predict([-3.0, -1.0]).label == 1 and nsmc.predict([-3.0, -1.0]).score is None
    p = sts.predict([math.log(0.2), math.log(0.6)])  # P(예) renormalized: 0.6 / 0.8
    assert p.label == 1 and p.score == pytest.approx(5 * 0.75)
    assert sts.predict([-1000.0, -1001.0]).score == pytest.approx(5 / (1 + math.e))  # no underflow


def test_task_metrics_use_the_right_fields():
    ex = [Example(str(i), "t", y, text_pair="u", score=s) for i, (y, s) in enumerate([(1, 4.0), (0, 1.0), (1, 3.0)])]
    preds = [TASKS["korsts"].predict(lp) for lp in ([-1.0, -0.1], [-0.1, -2.0], [-0.5, -1.0])]
    assert TASKS["klue-sts"].metrics(ex, preds)["f1"] == pytest.approx(2 / 3)  # tp 1, 1 predicted, 2 gold
    assert TASKS["korsts"].metrics(ex, preds)["spearman"] == pytest.approx(1.0)
    assert TASKS["nsmc"].metrics(ex, preds) == {"accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx(2 / 3)}


def test_unknown_task():
    with pytest.raises(UserError, match="unknown task 'kornli'; choose one of nsmc, ynat, klue-sts, korsts"):
        get_task("kornli")
