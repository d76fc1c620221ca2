"""A text adventure on a KoGPT: the story as an opening plus turns (action, continuation), the prompt
built from it and trimmed to the model's window, continuations cut at a sentence end, save/load as JSON.

The story text the model reads is the opening, then for each turn the action on a line of its own,
"\\n> 문을 연다\\n", and the continuation; generation stops at "\\n>" (the model starting the player's
next line). No terminal I/O here: kogpt/cli/adventure.py is the loop around Adventure.

    game = Adventure(gpt, Story(OPENINGS[0][1])); print("".join(game.play("문을 연다")))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError
from ..fileio import FileFormatError, read_json, write_json

FORMAT = "kogpt-adventure"
FORMAT_VERSION = 1
STOPS = ("\n>",)  # the model writing the player's next action ends its turn

# (title, opening); the player is "너", actions are plain Korean sentences ("문을 연다")
OPENINGS: tuple[tuple[str, str], ...] = (
    ("판타지 던전", "너는 이름 없는 모험가다. 횃불 하나와 녹슨 검을 들고 오래된 던전의 입구에 섰다. "
                "돌계단 아래에서 차가운 바람이 불어오고, 멀리서 무언가 바닥을 긁는 소리가 들린다."),
    ("현대 미스터리", "비 오는 밤, 너는 서울의 작은 탐정 사무소에 앉아 있다. 문틈으로 봉투 하나가 밀려 들어온다. "
                  "봉투 안에는 낡은 열쇠와 '내일 자정, 한강 다리 아래'라고 적힌 쪽지가 들어 있다."),
    ("SF 우주선", "냉동 수면에서 깨어나 보니 우주선 안은 고요하다. 붉은 경보등만 깜박이고, 다른 승무원들의 "
               "수면 캡슐은 모두 비어 있다. 조종실 화면에는 '항로 이탈'이라는 글자가 떠 있다."),
    ("학교 괴담", "야간 자율 학습이 끝난 밤 열 시, 너는 두고 온 휴대폰을 가지러 혼자 교실로 돌아간다. "
               "복도 불은 꺼져 있고, 아무도 없어야 할 음악실에서 피아노 소리가 들려온다."),
)

# story sampling: varied but on topic; every key can be overridden (CLI flags)
DEFAULT_OPTIONS = {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3,
                   "max_new_tokens": 80}

# a sentence ends at . ! ? … 。 (plus closing quotes/brackets) followed by whitespace or the end of
# the text ("3.5" has no end), or where a line ends
_END = re.compile(r"[.!?…。][\"'”’」』)\]]*(?=\s|$)|(?=\n)")


@dataclass
class Turn:
    action: str  # what the player typed, e.g. "문을 연다"
    text: str  # the continuation kept in the story (cut at a sentence end)


@dataclass
class Story:
    opening: str
    turns: list[Turn] = field(default_factory=list)

    def text(self) -> str:
        """The whole story as the model reads it."""
        return self.opening + "".join(turn_text(t) for t in self.turns)

    def undo(self) -> Turn | None:
        """Remove and return the last turn (None when only the opening is left)."""
        return self.turns.pop() if self.turns else None


def action_line(action: str) -> str:
    return f"\n> {action}\n"


def turn_text(t: Turn) -> str:
    return action_line(t.action) + t.text


# -- sentence ends ------------------------------------------------------------------------------
def _last_end(text: str, final: bool) -> int:
    """Index just past the last sentence end with some text before it (0: none). Unless `final`,
    punctuation at the very end does not count yet: the next piece may be a digit ("3.5")."""
    best = 0
    for m in _END.finditer(text):
        if (final or m.end() < len(text)) and text[:m.end()].strip():
            best = m.end()
    return best


def trim_to_sentence(text: str) -> str:
    """`text` cut after its last sentence end (다. 요. ! ? … or a line end) and stripped; all of it
    (stripped) when it has none."""
    end = _last_end(text, final=True)
    return (text[:end] if end else text).strip()


class SentenceStream:
    """A continuation shown sentence by sentence: what push() and finish() return joins to
    trim_to_sentence(all the text pushed, U+FFFD removed)."""

    def __init__(self):
        self.text, self.shown = "", ""

    def push(self, piece: str) -> str:
        """Add generated text; return the part of the kept text that is now certain."""
        self.text += piece.replace("\ufffd", "")  # bytes a weak model got wrong are no story
        end = _last_end(self.text, final=False)
        return self._show(self.text[:end].strip()) if end else ""

    def finish(self) -> str:
        """The rest of the kept text, once generation has ended."""
        return self._show(trim_to_sentence(self.text))

    def _show(self, kept: str) -> str:
        new, self.shown = kept[len(self.shown):], kept  # kept always extends what was shown
        return new


# -- the model's window -------------------------------------------------------------------------
def keep_tail(text: str, count: Callable[[str], int], budget: int) -> str:
    """The longest suffix of `text` (whole characters) of at most `budget` tokens."""
    lo, hi = 0, len(text)  # binary search for the first start index that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if count(text[mid:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


def build_prompt(story: Story, action: str, count: Callable[[str], int], budget: int) -> str:
    """The story plus the new action line in at most `budget` tokens (as `count` counts them): the
    oldest turns go first, the opening never, unless the opening and the action alone are too long
    (then their tail is kept)."""
    if budget < 1:
        raise UserError("no room for the story: max_new_tokens fills the model's whole window")
    head, tail = story.opening, action_line(action)
    if count(head + tail) > budget:
        return keep_tail(head + tail, count, budget)
    parts = [turn_text(t) for t in story.turns]

    def fits(k: int) -> bool:  # the turns from k on fit
        return count(head + "".join(parts[k:]) + tail) <= budget

    # estimate from per-part counts (joined text tokenizes about the same), then settle exactly
    k, used = len(parts), count(head + tail)
    while k > 0 and used + count(parts[k - 1]) <= budget:
        used += count(parts[k - 1])
        k -= 1
    while k > 0 and fits(k - 1):
        k -= 1
    while k < len(parts) and not fits(k):
        k += 1
    return head + "".join(parts[k:]) + tail


# -- save / load --------------------------------------------------------------------------------
def save_story(path: str | os.PathLike, story: Story, model: str, settings: dict) -> None:
    """Write the story as JSON, atomically (an interrupted save leaves the old file whole)."""
    write_json(Path(path), {"format": FORMAT, "version": FORMAT_VERSION, "model": model, "opening": story.opening,
                            "turns": [{"action": t.action, "text": t.text} for t in story.turns],
                            "settings": settings})


def load_story(path: str | os.PathLike) -> tuple[Story, dict]:
    """(Story, the whole JSON object) of a save_story file; FileFormatError says what is wrong."""
    d = read_json(Path(path))

    def bad(why: str) -> FileFormatError:
        return FileFormatError(f"{path} is not a kogpt adventure save: {why}")

    if d.get("format") != FORMAT:
        raise bad(f'"format" must be "{FORMAT}"')
    if not isinstance(d.get("version"), int) or not 1 <= d["version"] <= FORMAT_VERSION:
        raise bad(f'"version" {d.get("version")!r} is not one this kogpt reads (1 to {FORMAT_VERSION})')
    if not isinstance(d.get("opening"), str) or not d["opening"].strip():
        raise bad('"opening" must be a non-empty string')
    turns = d.get("turns", [])
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("action"), str) and isinstance(t.get("text"), str) for t in turns):
        raise bad('"turns" must be a list of {"action": string, "text": string}')
    if not isinstance(d.get("settings", {}), dict):
        raise bad('"settings" must be an object')
    return Story(d["opening"], [Turn(t["action"], t["text"]) for t in turns]), d


# -- the game -----------------------------------------------------------------------------------
class Adventure:
    """A story played on a KoGPT: play an action, retry, undo, steer by genre, save and load.

    options: KoGPT.options() keys (DEFAULT_OPTIONS, then these overrides). seed: generation n uses
    seed + n, so the same inputs replay the same session and a retry gives a new sample. genre: passed
    to the model as bow= (PPLM bag-of-words steering: a topic name, a word-list file or words).
    """

    def __init__(self, gpt, story: Story, options: dict | None = None, seed: int | None = None,
                 genre: str | None = None, stop: tuple[str, ...] = ()):
        self.gpt, self.story = gpt, story
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        self.seed, self.genre, self.stops = seed, genre, STOPS + tuple(stop)
        self.generations = 0

    def prompt(self, action: str) -> str:
        """The model prompt for `action`: the story trimmed so prompt + max_new_tokens fit the window."""
        window = self.gpt.model.config.n_positions
        return build_prompt(self.story, action, lambda s: len(self.gpt.tokenizer.encode(s)),
                            window - self.options["max_new_tokens"])

    def play(self, action: str) -> Iterator[str]:
        """Yield the continuation of `action` sentence by sentence; the turn joins the story when it is
        done. An error (e.g. a genre the model cannot use) or an interruption leaves the story as it was."""
        action = " ".join(action.split())
        if not action:
            raise UserError("an action needs some text, e.g. 문을 연다")
        kw = dict(self.options, stop=self.stops)
        if self.seed is not None:
            kw["seed"] = self.seed + self.generations
        if self.genre:
            kw["bow"] = self.genre
        prompt = self.prompt(action)
        self.generations += 1
        stream = SentenceStream()
        for piece in self.gpt.stream(prompt, **kw):
            shown = stream.push(piece)
            if shown:
                yield shown
        rest = stream.finish()
        if rest:
            yield rest
        self.story.turns.append(Turn(action, stream.shown))

    def retry(self) -> Iterator[str]:
        """Regenerate the last continuation (a new sample); the old one stays if this fails."""
        last = self.story.undo()
        if last is None:
            raise UserError("nothing to retry yet: type an action first")
        n = len(self.story.turns)
        try:
            yield from self.play(last.action)
        finally:
            if len(self.story.turns) == n:  # failed or interrupted: put the old turn back
                self.story.turns.append(last)

    def undo(self) -> Turn | None:
        return self.story.undo()

    def settings(self) -> dict:
        return {"genre": self.genre, "seed": self.seed, "options": dict(self.options)}

    def save(self, path: str | os.PathLike) -> None:
        save_story(path, self.story, self.gpt.name, self.settings())

    def load(self, path: str | os.PathLike) -> dict:
        """Continue a saved story with its genre (sampling options stay this session's); returns the
        save's JSON object. A saved genre must be a bundled topic: a save never makes the game read
        a file; any other genre is dropped (d["dropped_genre"] names it)."""
        from ..generation.steering import TOPICS

        story, d = load_story(path)
        genre = d.get("settings", {}).get("genre")
        if not (isinstance(genre, str) and (genre in TOPICS or genre in TOPICS.values())):
            if genre:
                d["dropped_genre"] = str(genre)
            genre = None
        self.story, self.genre = story, genre
        return d
