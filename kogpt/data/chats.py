"""Chat training files → conversations: JSONL rows of messages or prompt/completion, or a Q,A CSV.

What `kogpt sft` trains on, read and checked row by row. A JSONL row is {"messages": [{"role",
"content"}, ...]} (roles system, user, assistant) or {"prompt", "completion"}; a CSV row's Q is the
user's turn and A the assistant's (ChatbotData.csv). A row that is no conversation (invalid JSON,
missing keys, an unknown role, no or an empty assistant turn) is a DataError naming file:line, or,
with skip_bad, is left out and returned among the bad rows.

    conversations, bad = read_conversations("chat.jsonl", skip_bad=True)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .corpus import DataError, _csv_rows

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    where: str  # file:line, for messages about the row
    messages: list[dict]  # [{"role": ..., "content": ...}], checked


class BadRow(ValueError):
    """Why one row is not a conversation (the reader adds file:line)."""


def _checked(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise BadRow(f"message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow(f"message {i} has the unknown role {m['role']!r}; use system, user or assistant")
        if not isinstance(m["content"], str):
            raise BadRow(f"message {i}: 'content' must be a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow(f"message {i} is an empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no assistant turn to learn from")
    return out


def _json_row(line: str) -> list[dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise BadRow("expected a JSON object")
    if "messages" in row:
        return _checked(row["messages"])
    if not {"prompt", "completion"} <= set(row):
        raise BadRow("a row needs 'messages', or 'prompt' and 'completion'")
    return _checked([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}])


def _rows(path: Path):
    """(line number, messages or the BadRow) of each row of a JSONL or Q,A CSV file."""
    with open(path, encoding="utf-8-sig", newline="" if path.suffix == ".csv" else None) as f:
        if path.suffix != ".csv":
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, _json_row(line)
                    except BadRow as e:
                        yield n, e
            return
        reader = csv.DictReader(f)
        rows, line = _csv_rows(f, path, lambda f: reader), 2
        if not {"Q", "A"} <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: a chat CSV needs Q and A columns, found {reader.fieldnames}")
        for row in rows:
            try:
                q, a = row["Q"] or "", row["A"] or ""  # None: the row ends before the column
                yield line, _checked([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            except BadRow as e:
                yield line, e
            line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)


def read_conversations(path: str | Path, skip_bad: bool = False, limit: int = 0
                       ) -> tuple[list[Conversation], list[str]]:
    """The file's conversations (the first `limit` rows when limit > 0) and its bad rows as "file:line: why"
    (skip_bad), or a DataError at the first bad row."""
    path = Path(path)
    good, bad = [], []
    try:
        for n, row in _rows(path):
            if limit and len(good) + len(bad) >= limit:
                break
            if isinstance(row, BadRow):
                if not skip_bad:
                    raise DataError(f"{path}:{n}: {row} (--skip-bad-rows leaves such rows out)")
                bad.append(f"{path}:{n}: {row}")
            else:
                good.append(Conversation(f"{path}:{n}", row))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return good, bad
