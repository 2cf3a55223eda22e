"""autoglm config validate: syntax, schema and semantic errors, each on the line the file wrote it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openautoglm.cli.main import app
from openautoglm.config.settings import load_settings
from openautoglm.ops.config_check import check_text
from openautoglm.ops.yaml_positions import YamlSyntaxError, load_with_positions

runner = CliRunner()


def _issues(text: str, **kw: object) -> dict[str, tuple[str, int | None, str]]:
    report = check_text(text, "test.yaml", **kw)  # type: ignore[arg-type]
    return {i.path: (i.severity, i.line, i.message + " " + (i.hint or "")) for i in report.issues}


def test_positions_of_keys_and_list_items() -> None:
    doc = load_with_positions("a:\n  b: 1\n  c:\n    - x: 2\n    - {y: 3}\n")
    assert doc.positions[("a", "b")] == (2, 3)
    assert doc.positions[("a", "c", 0)] == (4, 7)
    assert doc.positions[("a", "c", 1, "y")] == (5, 8)
    assert doc.locate(("a", "c", 1, "missing")) == (("a", "c", 1), (5, 7))


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(YamlSyntaxError) as exc:
        load_with_positions("server:\n  port: 8000\n   host: x\n")
    assert (exc.value.line, exc.value.column) == (3, 8)
    report = check_text("engine:\n  model: [unclosed\n")
    assert not report.ok and report.issues[0].line == 3


def test_unknown_key_suggests_the_closest() -> None:
    found = _issues("engine:\n  scheduler:\n    max_num_seq: 8\n")
    severity, line, text = found["engine.scheduler.max_num_seq"]
    assert (severity, line) == ("error", 3) and "did you mean 'max_num_seqs'" in text
    found = _issues("sever:\n  port: 1\n")
    assert "did you mean 'server'" in found["sever"][2]
    found = _issues("server:\n  zzzz: 1\n")
    assert "known keys here: host, port" in found["server.zzzz"][2]


def test_type_and_range_errors_name_expected_and_found() -> None:
    text = "router:\n  deployments:\n    - model: m\n      backends:\n        - {name: a, url: 'http://x', weight: 0}\n"
    _, line, msg = _issues(text)["router.deployments.0.backends.0.weight"]
    assert line == 5 and "greater than 0" in msg and "expected number, found 0 (integer)" in msg
    _, line, msg = _issues("engine:\n  scheduler:\n    max_num_seqs: lots\n")["engine.scheduler.max_num_seqs"]
    assert line == 3 and "expected integer, found 'lots' (string)" in msg
    _, _, msg = _issues("engine:\n  model:\n    dtype: fp64\n")["engine.model.dtype"]
    assert "one of 'auto', 'float32', 'bfloat16', 'float16'" in msg


def test_duplicate_keys_are_errors() -> None:
    assert _issues("server:\n  port: 9001\n  port: 9002\n")["server.port"][:2] == ("error", 3)


def test_durations_with_units() -> None:
    settings = load_settings(
        None, {"server": {"drain_timeout": "2m"}, "router": {"health": {"interval_s": "250ms", "timeout_s": 0.1}}}, {}
    )
    assert settings.server.drain_timeout == 120.0 and settings.router.health.interval_s == 0.25
    env = {"AUTOGLM_GATEWAY__BRUTE_FORCE__BLOCK_S": "1h"}
    assert load_settings(None, None, env).gateway.brute_force.block_s == 3600.0
    _, line, msg = _issues("server:\n  drain_timeout: 5 minutes\n")["server.drain_timeout"]
    assert line == 2 and "is not a duration" in msg and "expected duration" in msg


SEMANTIC = """\
engine:
  model: {model: glm-4-9b-0414, max_model_len: 40000, quantization: fp8, device: cpu}
  scheduler: {max_num_batched_tokens: 8}
server: {port: 9000, grpc_port: 9000}
router:
  retry: {backoff_base_s: 2s, backoff_max_s: 1s}
  health: {timeout_s: 5s, interval_s: 5s}
  deployments:
    - model: glm
      canary: {version: v2}
      backends:
        - {name: a, url: "http://x/v1", version: v1, first_byte_timeout_s: 2m}
"""


def test_semantic_rules() -> None:
    found = _issues(SEMANTIC)
    expect = {
        "engine.model.max_model_len": (2, "max_position_embeddings (32768)"),
        "engine.model.quantization": (2, "compute capability 9.0"),
        "engine.scheduler.max_num_batched_tokens": (3, "below engine.cache.block_size (16)"),
        "server.grpc_port": (4, "both use port 9000"),
        "router.retry.backoff_base_s": (6, "above backoff_max_s"),
        "router.health.timeout_s": (7, "not below the interval"),
        "router.deployments.0.stable_version": (9, "stable version 'stable'"),
        "router.deployments.0.canary.version": (10, "canary version 'v2'"),
    }
    for path, (line, text) in expect.items():
        assert found[path][0] == "error" and found[path][1] == line and text in found[path][2], (path, found[path])
    warn = found["router.deployments.0.backends.0.first_byte_timeout_s"]
    assert warn[0] == "warning" and "default_deadline_s" in warn[2]


def test_chunked_prefill_rule_from_the_schema() -> None:
    text = (
        "engine:\n  model: {max_model_len: 4096}\n"
        "  scheduler: {max_num_batched_tokens: 2048, enable_chunked_prefill: false}\n"
    )
    severity, line, msg = _issues(text)["engine"]
    assert severity == "error" and line == 1 and "chunked prefill is off" in msg


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may enter (pytest's tmp_path sits under a private 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="autoglm-tls-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_tls_files(open_dir: Path) -> None:
    tmp_path = open_dir
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("key")
    cert.write_text("cert")
    key.chmod(0o644)
    text = f"gateway:\n  tls: {{cert_file: {cert}, key_file: {key}}}\n"
    assert "readable by every user" in _issues(text)["gateway.tls.key_file"][2]
    key.chmod(0o640)
    assert _issues(text)["gateway.tls.key_file"][0] == "warning"
    key.chmod(0o600)
    assert "gateway.tls.key_file" not in _issues(text)
    tmp_path.chmod(0o700)
    key.chmod(0o644)  # world-readable mode, but nobody else can reach it
    assert "gateway.tls.key_file" not in _issues(text)
    missing = f"gateway:\n  tls: {{cert_file: {tmp_path / 'nope.pem'}, key_file: {key}}}\n"
    assert "does not exist" in _issues(missing)["gateway.tls.cert_file"][2]
    if os.geteuid() != 0:
        key.chmod(0o000)
        assert "not readable" in _issues(text)["gateway.tls.key_file"][2]


def test_shared_state_rules() -> None:
    found = _issues("store: {url: 'postgresql://u:p@db/x'}\ngateway: {auth: {secret: s3cret}}\n")
    assert found["store.redis_url"][0] == "warning"
    assert found["store.url"][0] == "warning" and "AUTOGLM_STORE__URL" in found["store.url"][2]
    assert "AUTOGLM_GATEWAY__AUTH__SECRET" in found["gateway.auth.secret"][2]
    found = _issues("server: {host: 0.0.0.0}\ngateway: {auth: {required: false}}\n")
    assert found["gateway.auth.required"][0] == "error"


def test_valid_file_has_no_issues() -> None:
    assert check_text("server: {port: 8080, grpc_port: 8081, drain_timeout: 45s}\n").issues == []
    assert check_text("").issues == []


def test_cli_validate_exit_codes_and_json(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("server: {port: 8080}\n")
    bad.write_text("engine:\n  scheduler:\n    max_num_seq: 8\n")
    ok = runner.invoke(app, ["config", "validate", str(good)])
    assert ok.exit_code == 0 and "valid" in ok.output
    res = runner.invoke(app, ["config", "validate", str(bad), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.output)
    assert report["ok"] is False and report["issues"][0]["line"] == 3
    missing = runner.invoke(app, ["config", "validate", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 1 and "cannot read" in missing.output


def test_cli_show_masks_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_STORE__URL", "postgresql://user:hunter2@db/autoglm")
    monkeypatch.setenv("AUTOGLM_SERVER__PORT", "9123")
    res = runner.invoke(app, ["config", "show", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["server"]["port"] == 9123 and "hunter2" not in res.output and shown["store"]["url"] == "**********"


def test_cli_schema_is_json_schema() -> None:
    res = runner.invoke(app, ["config", "schema"])
    schema = json.loads(res.output)
    assert set(schema["properties"]) >= {"engine", "server", "gateway", "store", "router"}


def test_configuration_reference_is_current() -> None:
    from openautoglm.ops.config_docs import render_markdown

    path = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert path.read_text() == render_markdown(), "stale: run `autoglm config docs --output docs/configuration.md`"


def test_serve_refuses_an_invalid_file_before_loading(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 9000\n  grpc_port: 9000\n  drain_timout: 5s\n")
    res = runner.invoke(app, ["serve", "--config", str(bad)])
    assert res.exit_code == 2 and "did you mean 'drain_timeout'" in res.output
    bad.write_text("server:\n  port: 9000\n  grpc_port: 9000\n")
    res = runner.invoke(app, ["serve", "--config", str(bad)])
    assert res.exit_code == 2 and f"{bad}:3:3: error: server.grpc_port" in res.output
