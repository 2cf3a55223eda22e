"""The CLI as a user runs it: real subprocesses of `autoglm` (test 6: demo checkpoint round trip)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

AUTOGLM = [sys.executable, "-m", "openautoglm.cli.main"]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AUTOGLM, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_demo_model_round_trip_through_cli_and_loader(tmp_path: Path) -> None:
    out = _run("demo-model", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["architectures"] == ["Glm4ForCausalLM"]
    gen = _run("generate", "--model", str(tmp_path / "demo"), "--max-tokens", "5", "--no-stream", "Hello")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip()
    # The same checkpoint through the library gives the same greedy text.
    from openautoglm.engine.llm import LLM
    from openautoglm.protocol.sampling import SamplingParams

    llm = LLM(model=str(tmp_path / "demo"), device="cpu")
    text = llm.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0))[0].sequences[0].text
    assert gen.stdout.rstrip("\n") == text


@pytest.mark.slow
def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = _run("generate", "--model", str(tmp_path / "missing"), "hi")
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "Traceback" not in bad.stderr
    bad_tokens = _run("generate", "--max-tokens", "0", "hi")
    assert bad_tokens.returncode == 2 and "max_tokens" in bad_tokens.stderr


@pytest.mark.slow
def test_bench_offline_reports_json_beside_the_transformers_reference() -> None:
    args = ("--num-requests", "4", "--input-len", "8:16", "--output-len", "4", "--compare-transformers", "--json")
    out = _run("bench", "offline", *args)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    engine, reference = result["results"]
    assert engine["num_requests"] == reference["num_requests"] == 4
    assert engine["input_tokens"] == reference["input_tokens"]  # the same prompts
    assert engine["output_tokens"] == reference["output_tokens"] == 16
    assert reference["name"] == "transformers generate_batch" and result["output_tokens_per_s_ratio"] > 0


@pytest.mark.slow
def test_chat_keeps_history_and_exits_on_eof() -> None:
    chat = subprocess.run(
        [*AUTOGLM, "chat", "--max-tokens", "4", "--temperature", "0"],
        input="hello there\n/reset\nagain\n",
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    # Two answered turns, the /reset line in between answered with nothing, then EOF ends the session.
    assert chat.stdout.count("glm>") == 2
    assert chat.stdout.count("you>") == 4
