"""`autoglm task …` as a user runs it (real subprocesses over the demo model): the result has the task's shape,
--explain prints the prompt the builder makes, bad input is one clear error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
import pytest

from openautoglm.tasks import prompts

AUTOGLM = [sys.executable, "-m", "openautoglm.cli.main", "task"]
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AUTOGLM, *args], capture_output=True, text=True, timeout=240, check=False)


def test_classify_and_extract(tmp_path: Path) -> None:
    out = _run("classify", "The app crashes", "-l", "bug", "-l", "praise", "--explain")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["result"]["label"] in ("bug", "praise")
    assert body["prompt"]["messages"] == prompts.classify("The app crashes", ["bug", "praise"]).messages
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out = _run("extract", "seven", "--schema", str(tmp_path / "s.json"), "-t", "1", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(out.stdout)["result"]["data"])
    bad = _run("summarize", "text", "--style", "haiku")
    assert bad.returncode == 2 and "style" in bad.stderr and "Traceback" not in bad.stderr
