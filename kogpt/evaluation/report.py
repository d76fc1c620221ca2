"""Reporting evaluation results: a Markdown table of their metrics, and JSON without NaN.

    print(markdown_table([result])); write_json(path, json_ready(result))
"""

from __future__ import annotations

import math
from typing import Sequence


def markdown_table(results: Sequence[dict]) -> str:
    """A Markdown table with one row per result (few-shot metrics ×100, as the model cards print them)."""
    names = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    head = ["model", "task", "prompt", "shots", "n", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        scale = 1 if r["task"] == "perplexity" else 100
        prompt = r.get("prompt_version") or ("finetuned head" if r.get("method") == "finetuned" else "-")
        cells = [r["model"], r["task"], prompt, str(r.get("shots", "-")), str(r["n"])]
        cells += [_fmt(r["metrics"].get(k), scale) for k in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float | None, scale: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v * scale:.2f}" if scale != 1 else f"{v:.4f}"


def json_ready(obj):
    """`obj` with NaN floats replaced by None (JSON has no NaN; a constant prediction has no correlation)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_ready(v) for v in obj]
    return obj
