"""`autoglm templates …` as a user runs it, on a SQLite store: create (versions), list, show, render, the audit
record, and errors as one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOGLM_STORE__DATA_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "openautoglm.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)


def test_templates_round_trip(tmp_path: Path) -> None:
    (tmp_path / "t1.j2").write_text("Review {{ product }} in {{ n }} words.")
    (tmp_path / "t2.j2").write_text("{% for p in products %}- {{ p }}\n{% endfor %}")
    first = _run(tmp_path, "templates", "create", "review", "-f", str(tmp_path / "t1.j2"), "-d", "reviews")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["version"] == 1
    second = _run(tmp_path, "templates", "create", "review", "-f", str(tmp_path / "t2.j2"))
    assert json.loads(second.stdout)["version"] == 2
    listed = json.loads(_run(tmp_path, "templates", "list").stdout)
    assert [(t["name"], t["version"], t["variables"]) for t in listed] == [("review", 2, ["products"])]
    shown = json.loads(_run(tmp_path, "templates", "show", "review", "--version", "1").stdout)
    assert shown["template"] == "Review {{ product }} in {{ n }} words." and shown["description"] == "reviews"
    out = _run(tmp_path, "templates", "render", "review", "-v", "1", "--var", "product=tea", "--var", "n=5")
    assert out.stdout == "Review tea in 5 words.\n"
    out = _run(tmp_path, "templates", "render", "review", "--var", 'products=["a", "b"]')
    assert out.stdout == "- a\n- b\n\n"
    missing = _run(tmp_path, "templates", "render", "review", "-v", "1", "--var", "product=tea")
    assert missing.returncode == 2 and "'n'" in missing.stderr and "Traceback" not in missing.stderr
    export = _run(tmp_path, "audit", "export", "--jsonl")
    actions = [json.loads(line)["action"] for line in export.stdout.splitlines() if line.strip()]
    assert actions.count("template.create") == 2
