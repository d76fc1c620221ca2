"""Chat messages → text and token ids, for base models that ship no chat template (KoGPT2, KoGPT).

The one chat template: `kogpt serve` renders a request's prompt with it and `kogpt sft` the training
conversations, so a tuned model sees at serving time the text it was trained on. The default is a
plain Korean dialogue transcript ("사용자:" / "어시스턴트:" turns after a short system line), ending
with "어시스턴트:" for the model to continue, and stop strings that end the reply when the model starts
the next turn. A JSON file can replace any field (--chat-template); the only placeholder is
`{content}`, substituted once with str.replace: no code runs from the file.

    prompt, stops = ChatTemplate.default().render([{"role": "user", "content": "안녕?"}])
    ids, mask = ChatTemplate.default().encode(messages, tokenizer)  # mask: the ids the model writes
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

from ..errors import UserError

DEFAULT_SYSTEM = "다음은 사용자와 AI 어시스턴트의 대화입니다. 어시스턴트는 친절하고 정확하게 한국어로 답합니다."


@dataclass(frozen=True)
class ChatTemplate:
    """How chat turns become text. Each *_turn holds `{content}` once."""

    name: str = "kogpt-ko-dialogue"
    system: str = DEFAULT_SYSTEM  # used when the request has no system message ("" for none)
    system_turn: str = "{content}\n\n"
    user_turn: str = "사용자: {content}\n"
    assistant_turn: str = "어시스턴트: {content}\n"
    generation: str = "어시스턴트:"  # appended last; the model continues from here
    stop: tuple[str, ...] = ("\n사용자:", "\n어시스턴트:")

    @classmethod
    def default(cls) -> "ChatTemplate":
        return cls()

    @classmethod
    def from_file(cls, path: str | Path) -> "ChatTemplate":
        """A template from a JSON object whose keys are any of the dataclass fields."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"chat template {path}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"chat template {path}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"chat template {path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        stop = data.pop("stop", cls.stop)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise UserError(f"chat template {path}: 'stop' must be a list of strings")
        if not all(isinstance(v, str) for v in data.values()):
            raise UserError(f"chat template {path}: every value except 'stop' must be a string")
        t = replace(cls(), name=str(path), **data, stop=tuple(stop))
        for key in ("system_turn", "user_turn", "assistant_turn"):
            if getattr(t, key).count("{content}") != 1:
                raise UserError(f"chat template {path}: '{key}' must contain {{content}} exactly once")
        return t

    def pieces(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
        """The conversation's text in pieces, each flagged True where the model writes it: an assistant
        turn after the `generation` text it is prompted with (its content and the turn's end)."""
        turns = {"system": self.system_turn, "user": self.user_turn, "assistant": self.assistant_turn}
        parts = []
        if self.system and not any(m["role"] == "system" for m in messages):
            parts.append((self.system_turn.replace("{content}", self.system), False))
        for m in messages:
            if m["role"] not in turns:
                raise UserError(f"unknown chat role {m['role']!r}; use system, user or assistant")
            text = turns[m["role"]].replace("{content}", m["content"])
            if m["role"] == "assistant":
                head = self.assistant_turn.split("{content}")[0]  # the turn's text before the reply
                cut = len(self.generation) if text.startswith(self.generation) else len(head)
                parts += [(text[:cut], False), (text[cut:], True)]
            else:
                parts.append((text, False))
        return parts

    def render(self, messages: Sequence[dict]) -> tuple[str, list[str]]:
        """(prompt, stop strings) for messages [{"role": "system"|"user"|"assistant", "content": str}]."""
        return "".join(text for text, _ in self.pieces(messages)) + self.generation, list(self.stop)

    def encode(self, messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation (no generation prompt) and, per id, whether the model writes
        it. The text is tokenized whole, as `render`'s prompt is at serving time; a token belongs to the
        model when it overlaps an assistant piece. A conversation ending in an assistant turn ends with
        EOS, the model's to write, so a tuned model stops after its reply."""
        spans, text = [], ""
        for piece, written in self.pieces(messages):
            if written:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        enc = tokenizer.tokenizer.encode(text, add_special_tokens=False)  # offsets: characters of `text`
        ids = list(enc.ids)
        mask = [any(s < b and e > a for a, b in spans) for s, e in enc.offsets]
        if messages and messages[-1]["role"] == "assistant" and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
            mask.append(True)
        return ids, mask

    def describe(self) -> dict:
        """The template as JSON-ready data (shown by GET /v1/models)."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d
