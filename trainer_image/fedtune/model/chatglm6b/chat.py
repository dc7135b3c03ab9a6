"""How upstream's `chat()` talks: the prompt with the conversation so far, and the answer's tidying."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Upstream turns ASCII punctuation next to a Chinese character into the full-width one.
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The query alone, or after the earlier rounds as `[Round i]\\n问：...\\n答：...`."""
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{old}\n答：{answer}\n" for i, (old, answer) in enumerate(history))
    return f"{rounds}[Round {len(history)}]\n问：{query}\n答："


def process_response(response: str) -> str:
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in _PUNCTUATION:
        response = re.sub(rf"([\u4e00-\u9fff]){ascii_mark}", rf"\1{full_width}", response)
        response = re.sub(rf"{ascii_mark}([\u4e00-\u9fff])", rf"{full_width}\1", response)
    return response
