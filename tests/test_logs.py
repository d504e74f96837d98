"""Logs: text for people by default, one JSON object a line with --log-format json."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

from elasticd.logs import JsonFormatter, message_fields
from elasticd.retry import wait_until

C_CORE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def test_message_fields_are_typed_and_unquoted() -> None:
    fields = message_fields(
        "event=shard_create_refused ps=ps-0 generation=3 ratio=0.5 reason='no room left'"
    )
    assert fields == {
        "event": "shard_create_refused", "ps": "ps-0", "generation": 3, "ratio": 0.5,
        "reason": "no room left",
    }  # fmt: skip
    assert message_fields("event=x level=7")["field_level"] == 7  # never overwrites our own


def test_a_record_with_an_exception_is_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "n", logging.ERROR, __file__, 1, "event=e job=%s", ("j1",), sys.exc_info()
        )
    line = JsonFormatter("controller").format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["event"], parsed["job"], parsed["process"]) == ("e", "j1", "controller")
    assert "ValueError: boom" in parsed["error"]


def test_a_daemon_started_with_log_format_json_writes_only_json(etcd, prefix, tmp_path) -> None:
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "elasticd", "controller", "--etcd", etcd.endpoint,
             "--prefix", prefix, "--checkpoint-url", str(tmp_path / "ckpt"), "--log-format",
             "json"],
            stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        wait_until(
            lambda: "controller_ready" in log_path.read_text(), 60, "the controller to start"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # gRPC's C core writes its own rare lines ("I1202 12:00:00.000 ... file.cc:12] ...")
    # straight to stderr, past Python's logging; every line of elasticd's is JSON.
    lines = [line for line in log_path.read_text().splitlines() if not C_CORE.match(line)]
    records = [json.loads(line) for line in lines]
    ready = next(r for r in records if r.get("event") == "controller_ready")
    assert ready["process"] == "controller" and ready["level"] == "INFO" and ready["address"]
