"""How every fedtune process logs: text lines for people, or JSON lines for log pipelines.

`FEDTUNE_LOG_FORMAT=json` (or the operator's `--log-format json`) writes one JSON object per
line: time (UTC, ISO 8601), level, logger, who (the role, party or `operator`), message, and
the exception's traceback when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

FORMAT_ENV = "FEDTUNE_LOG_FORMAT"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, who: str) -> None:
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out = {"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname,
               "logger": record.name, "who": self.who, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(who: str, level: str, fmt: str | None = None) -> None:
    """Log to stderr at `level` in `fmt` (default: $FEDTUNE_LOG_FORMAT, else text)."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"{FORMAT_ENV}={fmt}: the log format is one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(who))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
