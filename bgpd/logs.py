"""Log set-up shared by the daemon and the controller: ``LOG_LEVEL`` (debug, info, warning, error) and
``LOG_FORMAT``: ``text`` (time level logger message; messages are written as key=value pairs already) or
``json`` (one object per line: time, level, logger, message, and the exception when there is one)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(env: Mapping[str, str]) -> str | None:
    """Configure the root logger; returns a problem with the settings (then defaults are used), or None."""
    level, style = env.get("LOG_LEVEL", "info").lower(), env.get("LOG_FORMAT", "text").lower()
    problem = None
    if level not in LEVELS:
        problem, level = f"LOG_LEVEL={level!r}: use one of {', '.join(LEVELS)}; using info", "info"
    if style not in FORMATS:
        problem, style = f"LOG_FORMAT={style!r}: use text or json; using text", "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if style == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return problem


def start(env: Mapping[str, str], log: logging.Logger) -> None:
    """A process's logging from its environment; a bad setting is said once, on ``log``, and defaults are used."""
    problem = setup(env)
    if problem:
        log.warning("%s", problem)
