"""The daemons' logs: one line per event, for people by default, JSON for collectors.

Every message is written as ``event=NAME key=value ...``. The text format
prints it after the time, level and process; ``--log-format json`` (or
``ELASTICD_LOG_FORMAT=json``, which an agent passes to its training processes)
prints one JSON object a line instead, with each ``key=value`` of the message
as a field of its own, ready for Loki, Elasticsearch or ``jq``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import time
from typing import BinaryIO

FORMATS = ("text", "json")
FORMAT_ENV = "ELASTICD_LOG_FORMAT"
_FIELD = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")
_RESERVED = {"ts", "level", "process", "pid", "logger", "message", "error"}


def message_fields(message: str) -> dict[str, object]:
    """The ``key=value`` pairs of a message; numbers become numbers, quotes are removed."""
    out: dict[str, object] = {}
    for key, raw in _FIELD.findall(message):
        value: object = raw
        if raw[:1] in "'\"" and raw[-1:] == raw[:1]:
            value = raw[1:-1]
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    pass
        out[f"field_{key}" if key in _RESERVED else key] = value
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": message,
            **message_fields(message),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def add_logging_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help=f"text (default) or json, one object a line (env {FORMAT_ENV})",
    )


def configure_logging(process: str, level: str | None = None, fmt: str | None = None) -> None:
    """One line per event on stderr, in ``fmt`` (else ELASTICD_LOG_FORMAT, else text)."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt not in FORMATS:
        raise SystemExit(f"elasticd {process}: {FORMAT_ENV} must be text or json, got {fmt!r}")
    os.environ[FORMAT_ENV] = fmt  # the processes this one starts log alike
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s process={process} pid=%(process)d %(name)s %(message)s"
            )
        )
    logging.basicConfig(
        level=(level or os.environ.get("ELASTICD_LOG_LEVEL", "INFO")).upper(), handlers=[handler]
    )
    # `kill -USR1 PID` writes every thread's stack to stderr: how to see where a
    # daemon that will not stop or answer is stuck, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def open_private_log(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened to append, created readable by its owner only: a process's log may
    say what another tenant's job does, and it is read through its owner's tools."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "ab")
