"""kogpt adventure: sentence-end trimming, the story trimmed to the model's window, undo/retry, save/load
(kogpt/adventure.py, with a fake model and the tiny ones), and the game played through a pty."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pexpect
import pytest
from test_cli import default_sigint

from kogpt.apps.adventure import (DEFAULT_OPTIONS, FORMAT_VERSION, OPENINGS, Adventure, SentenceStream, Story, Turn,
                             action_line, build_prompt, load_story, save_story, trim_to_sentence)
from kogpt.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- sentence ends ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,kept", [
    ("문이 열린다. 안은 어둡", "문이 열린다."),
    ("좋아요! 그리고", "좋아요!"),
    ("정말? 그래서", "정말?"),
    ('그가 말했다. "가자!" 그리고', '그가 말했다. "가자!"'),
    ("아무도 없다… 그런데", "아무도 없다…"),
    ("첫 줄은 끝\n둘째 줄은 미완", "첫 줄은 끝"),
    ("\n\n 첫 문장이다. 둘", "첫 문장이다."),
    ("값은 3.5이고 계속", "값은 3.5이고 계속"),  # no sentence end: all of it
    ("끝나지 않는 문장", "끝나지 않는 문장"),
    ("  끝났다.  ", "끝났다."),
    ("", ""),
])
def test_trim_to_sentence(text, kept):
    assert trim_to_sentence(text) == kept


def test_sentence_stream_shows_whole_sentences_and_joins_to_the_trimmed_text():
    s = SentenceStream()
    assert s.push("문이 삐걱 ") == ""
    assert s.push("열린다.") == ""  # may still go on ("열린다.." or a closing quote)
    assert s.push(" 값은 3.") == "문이 삐걱 열린다."  # but "3." may be "3.5"
    assert s.push("5이다. 그") == " 값은 3.5이다."
    assert s.push("리고") == ""
    assert s.finish() == ""  # the unfinished sentence is dropped
    assert s.shown == "문이 삐걱 열린다. 값은 3.5이다."

    rng = random.Random(0)
    texts = [" 문을 연다.\n안에는 아무도 없다! 그런데 누가", "끝없는 복도", "하나. 둘. 셋.", "\n\n", "아\ufffd아. 어"]
    for text in texts:
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            s = SentenceStream()
            out = "".join(s.push(p) for p in pieces) + s.finish()
            assert out == s.shown == trim_to_sentence(text.replace("\ufffd", ""))


# -- the model's window -------------------------------------------------------------------------
def story_of(n: int, opening: str = "옛날 옛적에 숲이 있었다.") -> Story:
    return Story(opening, [Turn(f"행동 {i}", f"결과 {i}이다.") for i in range(n)])


def test_build_prompt_keeps_all_of_a_short_story():
    story = story_of(3)
    assert build_prompt(story, "문을 연다", len, 10_000) == story.text() + "\n> 문을 연다\n"


def test_build_prompt_drops_the_oldest_turns_and_keeps_the_opening():
    story = story_of(10)
    budget = len(story.opening + action_line("문을 연다")) + 2 * len(action_line("행동 0") + "결과 0이다.") + 3
    prompt = build_prompt(story, "문을 연다", len, budget)  # count = characters
    assert prompt == story.opening + "".join(action_line(f"행동 {i}") + f"결과 {i}이다." for i in (8, 9)) \
        + "\n> 문을 연다\n"
    assert len(prompt) <= budget


def test_build_prompt_keeps_the_tail_of_an_opening_too_long_for_the_window():
    story = story_of(2, opening="아주 긴 서두. " * 30)
    prompt = build_prompt(story, "문을 연다", len, 40)
    assert len(prompt) == 40 and (story.opening + "\n> 문을 연다\n").endswith(prompt)
    with pytest.raises(UserError, match="no room"):
        build_prompt(story, "문을 연다", len, 0)


@pytest.fixture
def small_window_dir(family, korean_tokenizer, tmp_path):
    from conftest import make_hf_model

    make_hf_model(family, n_positions=48).save_pretrained(tmp_path)
    korean_tokenizer.save(tmp_path)
    return tmp_path


def test_prompt_fits_a_small_window_in_tokens(small_window_dir):
    from kogpt.api import KoGPT

    gpt = KoGPT.from_pretrained(small_window_dir)
    enc = gpt.tokenizer.encode
    game = Adventure(gpt, story_of(12), {"max_new_tokens": 8}, seed=1)
    prompt = game.prompt("문을 연다")
    assert len(enc(prompt)) + 8 <= 48
    assert prompt.startswith(game.story.opening) and prompt.endswith("결과 11이다.\n> 문을 연다\n")
    assert "행동 0" not in prompt  # the oldest turns went first
    assert len(enc(prompt + action_line("행동 10") + "결과 10이다.")) > 40  # ... but no more than needed
    "".join(game.play("문을 연다"))  # a full window generates without error
    assert len(game.story.turns) == 13

    game = Adventure(gpt, Story("아주 긴 서두가 계속된다. " * 20), {"max_new_tokens": 8})
    prompt = game.prompt("문을 연다")
    assert 0 < len(enc(prompt)) <= 40 and prompt.endswith("계속된다. \n> 문을 연다\n")


# -- the game with a fake model -----------------------------------------------------------------
class FakeGPT:
    """Streams fixed pieces (or raises), records each call's prompt and options."""

    def __init__(self, pieces=("문이 열린다. ", "안은 어둡", "다. 그리고 누"), error=None):
        self.pieces, self.error, self.calls, self.name = pieces, error, [], "fake"
        self.model = SimpleNamespace(config=SimpleNamespace(n_positions=1024))
        self.tokenizer = SimpleNamespace(encode=lambda s: list(s.encode()))

    def stream(self, prompt, **kw):
        self.calls.append((prompt, kw))
        if self.error:
            raise self.error
        yield from self.pieces


def test_play_keeps_whole_sentences_and_passes_the_story_options():
    gpt = FakeGPT()
    game = Adventure(gpt, Story("서두."), {"temperature": 0.5}, seed=7)
    assert list(game.play("  문을   연다 ")) == ["문이 열린다.", " 안은 어둡다."]
    assert game.story.turns == [Turn("문을 연다", "문이 열린다. 안은 어둡다.")]
    prompt, kw = gpt.calls[0]
    assert prompt == "서두.\n> 문을 연다\n"
    assert kw == {**DEFAULT_OPTIONS, "temperature": 0.5, "stop": ("\n>",), "seed": 7}  # no bow without a genre
    "".join(game.play("창문을 본다"))
    assert gpt.calls[1][0] == "서두.\n> 문을 연다\n문이 열린다. 안은 어둡다.\n> 창문을 본다\n"
    assert gpt.calls[1][1]["seed"] == 8  # each generation its own seed


def test_genre_is_passed_as_bow():
    gpt = FakeGPT()
    game = Adventure(gpt, Story("서두."), genre="fantasy")
    "".join(game.play("문을 연다"))
    assert gpt.calls[-1][1]["bow"] == "fantasy" and "seed" not in gpt.calls[-1][1]
    game.genre = None
    "".join(game.play("문을 닫는다"))
    assert "bow" not in gpt.calls[-1][1]


def test_undo_retry_and_failures_leave_the_story_consistent():
    gpt = FakeGPT()
    game = Adventure(gpt, Story("서두."), seed=1)
    for action in ("하나", "둘", "셋"):
        "".join(game.play(action))
    assert [t.action for t in game.story.turns] == ["하나", "둘", "셋"]
    assert game.undo().action == "셋" and game.undo().action == "둘"
    assert [t.action for t in game.story.turns] == ["하나"]
    gpt.pieces = ("다시 쓴다.",)
    assert "".join(game.retry()) == "다시 쓴다."
    assert game.story.turns == [Turn("하나", "다시 쓴다.")]
    gpt.error = UserError("unknown generation option(s): bow")
    with pytest.raises(UserError):
        "".join(game.retry())
    with pytest.raises(UserError):
        "".join(game.play("넷"))
    assert game.story.turns == [Turn("하나", "다시 쓴다.")]  # unchanged by the failures
    assert game.undo() is not None and game.undo() is None
    with pytest.raises(UserError, match="nothing to retry"):
        "".join(game.retry())
    with pytest.raises(UserError, match="needs some text"):
        "".join(game.play("   "))


# -- save / load --------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    story = Story("서두: \"따옴표\"와 줄바꿈\n", [Turn("문을 연다", "문이 열린다.\n바람이 분다."), Turn("뛴다", "")])
    path = tmp_path / "sub" / "save.json"
    save_story(path, story, "kogpt-mini", {"genre": "판타지", "seed": 3})
    raw = path.read_text(encoding="utf-8")
    assert "문을 연다" in raw  # UTF-8, not \u escapes
    assert [p.name for p in path.parent.iterdir()] == ["save.json"]  # no temporary file left
    loaded, d = load_story(path)
    assert loaded == story
    assert d["version"] == FORMAT_VERSION and d["model"] == "kogpt-mini" and d["settings"]["genre"] == "판타지"

    game = Adventure(FakeGPT(), Story("다른 이야기."))
    game.load(path)
    assert game.story == story and game.genre == "판타지"
    save_story(path, story, "kogpt-mini", {"genre": "/etc/passwd"})  # a save never makes the game read a file
    assert game.load(path)["dropped_genre"] == "/etc/passwd" and game.genre is None


@pytest.mark.parametrize("content,msg", [
    (None, "is missing"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"format": "other", "version": 1, "opening": "x"}', '"format"'),
    ('{"format": "kogpt-adventure", "version": 99, "opening": "x"}', '"version" 99'),
    ('{"format": "kogpt-adventure", "version": 1, "opening": ""}', '"opening"'),
    ('{"format": "kogpt-adventure", "version": 1, "opening": "x", "turns": [{"action": 1}]}', '"turns"'),
    ('{"format": "kogpt-adventure", "version": 1, "opening": "x", "settings": []}', '"settings"'),
])
def test_malformed_save_file_is_a_user_error_naming_the_file(tmp_path, content, msg):
    path = tmp_path / "save.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="save.json") as e:
        load_story(path)
    assert msg in str(e.value)
    game = Adventure(FakeGPT(), story_of(2))
    with pytest.raises(UserError):
        game.load(path)
    assert game.story == story_of(2)  # a failed load keeps the story


def test_the_tiny_model_plays_and_replays_with_a_seed(model_dir):
    from kogpt.api import KoGPT

    gpt = KoGPT.from_pretrained(model_dir)
    stories = []
    for _ in range(2):
        game = Adventure(gpt, Story(OPENINGS[0][1]), {"max_new_tokens": 16}, seed=5)
        shown = ["".join(game.play(a)) for a in ("문을 연다", "앞으로 간다")]
        assert [t.text for t in game.story.turns] == shown
        assert all(t == trim_to_sentence(t) for t in shown)
        stories.append(game.story)
    assert stories[0] == stories[1]


# -- the terminal -------------------------------------------------------------------------------
def spawn(*args, **kw) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "kogpt", "adventure", *map(str, args)], encoding="utf-8",
                         timeout=90, dimensions=(50, 400), preexec_fn=default_sigint, **kw)


def prompt(child) -> str:
    """Wait for the action prompt at the start of a line; what came before it, with plain newlines."""
    child.expect_exact("\r\n> ")
    return child.before.replace("\r\n", "\n")


def saved(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("family", ["gpt2"])
def test_a_session_through_the_terminal(model_dir, tmp_path):
    child = spawn("--model", model_dir, "--seed", 1, "--max-new-tokens", 24)
    child.expect_exact("4. 학교 괴담")
    child.expect_exact("opening> ")
    child.sendline("9")
    child.expect_exact("choose 1 to 4")
    child.sendline("1")
    child.expect_exact(OPENINGS[0][1])
    prompt(child)

    child.sendline("문을 연다")
    out = prompt(child)
    story = out.split("문을 연다\n", 1)[1].strip()  # after the echoed action: the continuation
    child.sendline(f"/save {tmp_path / 'a.json'}")
    child.expect_exact("saved to")
    prompt(child)
    a = saved(tmp_path / "a.json")
    assert a["version"] == FORMAT_VERSION and a["model"] == str(model_dir) and a["opening"] == OPENINGS[0][1]
    assert [t["action"] for t in a["turns"]] == ["문을 연다"] and a["settings"]["seed"] == 1
    assert a["settings"]["options"]["max_new_tokens"] == 24
    assert story == (a["turns"][0]["text"] or story)  # what was shown is what the story kept
    if not a["turns"][0]["text"]:
        assert "nothing came" in story

    child.sendline("/retry")
    prompt(child)
    child.sendline("창문을 깬다")
    prompt(child)
    child.sendline("/undo")
    child.expect_exact("undone: > 창문을 깬다")
    prompt(child)
    child.sendline(f"/save {tmp_path / 'b.json'}")
    prompt(child)
    b = saved(tmp_path / "b.json")
    assert [t["action"] for t in b["turns"]] == ["문을 연다"]  # retried, not repeated; the undone action gone
    assert "창문을 깬다" not in (tmp_path / "b.json").read_text(encoding="utf-8")

    child.sendline("/undo")
    child.expect_exact("undone: > 문을 연다")
    child.sendline("/undo")
    child.expect_exact("nothing to undo")
    prompt(child)
    child.sendline(f"/load {tmp_path / 'a.json'}")
    child.expect_exact("(1 turn, genre off)")
    prompt(child)
    child.sendline(f"/load {tmp_path / 'missing.json'}")
    child.expect_exact("cannot load:")
    assert "Traceback" not in prompt(child)
    child.sendline(f"/save {tmp_path / 'c.json'}")
    prompt(child)
    assert saved(tmp_path / "c.json")["turns"] == a["turns"]  # /load brought the saved story back

    child.sendline("/help")
    child.expect_exact("/undo")
    child.expect_exact("/quit")
    prompt(child)
    child.sendline("/dance")
    child.expect_exact("unknown command /dance; commands: /help /undo /retry /save /load /genre /story /quit")
    prompt(child)
    child.sendline("/quit")
    child.expect_exact("bye!")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("family", ["gpt2"])
@pytest.mark.parametrize("key", ["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_say_goodbye(model_dir, key):
    child = spawn("--model", model_dir, "--opening", "어두운 숲에 들어섰다.")
    child.expect_exact("어두운 숲에 들어섰다.")
    prompt(child)
    child.sendeof() if key == "ctrl-d" else child.sendintr()
    child.expect_exact("bye!")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


@pytest.mark.parametrize("family", ["gpt2"])
def test_load_flag_resumes_and_a_bad_save_fails_before_loading(model_dir, tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    save_story(good, Story("서두.", [Turn("문을 연다", "문이 열린다.")]), "x", {"genre": None})
    bad.write_text("{", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "kogpt", "adventure", "--model", str(model_dir), "--load", str(bad)],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "loading" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "kogpt", "adventure", "--model", str(model_dir), "--genre", "nosuch"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 2 and "neither a bundled topic" in r.stderr and "loading" not in r.stderr
    child = spawn("--model", model_dir, "--load", good)
    child.expect_exact("(1 turn, genre off, saved with model x)")
    child.expect_exact("> 문을 연다")
    prompt(child)
    child.sendline("/story")
    child.expect_exact("서두.")
    child.expect_exact("문이 열린다.")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("family", ["gpt2"])
def test_genre_steers_and_is_saved(model_dir, tmp_path):
    child = spawn("--model", model_dir, "--seed", 1, "--max-new-tokens", 8, "--genre", "fantasy",
                  "--opening", "어두운 숲에 들어섰다.")
    prompt(child)
    child.sendline("검을 뽑는다")
    assert "Traceback" not in prompt(child)
    child.sendline(f"/save {tmp_path / 'g.json'}")
    prompt(child)
    g = saved(tmp_path / "g.json")
    assert g["settings"]["genre"] == "fantasy" and [t["action"] for t in g["turns"]] == ["검을 뽑는다"]
    child.sendline("/genre nosuch")
    child.expect_exact("neither a bundled topic")
    child.sendline("/genre 공포")
    child.expect_exact("genre: 공포")
    child.sendline("/genre off")
    child.expect_exact("genre: off")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
