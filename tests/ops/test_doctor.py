"""autoglm doctor: each check against the real thing (sockets, Redis, databases, files), and the exit code."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openautoglm.cli.main import app
from openautoglm.config.settings import load_settings
from openautoglm.ops.doctor import (
    Check,
    DoctorContext,
    _fit_verdict,
    check_config,
    check_data_dir,
    check_ports,
    check_services,
    run_doctor,
)
from openautoglm.ops.doctor_env import known_bad_combinations
from openautoglm.ops.estimate import GiB, arch_for, estimate

REDIS_URL = os.environ.get("AUTOGLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _ctx(**overrides: object) -> DoctorContext:
    return DoctorContext(load_settings(None, overrides, {}), None, None)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_port_in_use_fails_with_a_fix(busy_port: int) -> None:
    checks = _by_name(list(check_ports(_ctx(server={"port": busy_port, "grpc_port": 0}))))
    check = checks[f"port {busy_port}"]
    assert check.status == "FAIL" and "in use" in check.detail and "--port" in (check.fix or "")


def test_free_port_passes() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert [c.status for c in check_ports(_ctx(server={"port": port, "grpc_port": 0}))] == ["PASS"]


def test_data_dir(tmp_path: Path) -> None:
    assert next(check_data_dir(_ctx(store={"data_dir": str(tmp_path / "data")}))).status == "PASS"
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    check = next(check_data_dir(_ctx(store={"data_dir": str(blocker / "data")})))
    assert check.status == "FAIL" and "AUTOGLM_STORE__DATA_DIR" in (check.fix or "")


def test_unreachable_services_fail(tmp_path: Path) -> None:
    ctx = _ctx(store={"redis_url": "redis://127.0.0.1:1/0", "url": "postgresql://u:secret@127.0.0.1:1/db"})
    checks = _by_name(list(check_services(ctx)))
    assert checks["redis"].status == "FAIL" and checks["database"].status == "FAIL"
    assert "secret" not in checks["database"].detail  # the password is never printed
    sqlite = _ctx(store={"url": f"sqlite:///{tmp_path / 'x.db'}"})
    assert _by_name(list(check_services(sqlite)))["database"].status == "PASS"


def test_reachable_redis_passes() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no Redis at {REDIS_URL}")
    assert _by_name(list(check_services(_ctx(store={"redis_url": REDIS_URL}))))["redis"].status == "PASS"


def test_known_bad_combinations() -> None:
    good = {"torch": "2.6.0+cu124", "numpy": "2.1.0", "pydantic": "2.10.0", "transformers": "4.56.0"}
    assert known_bad_combinations(good, ("12.4", True), {"driver": "550.54.15", "cuda": "12.4"}) == []
    old_driver = known_bad_combinations(good, ("12.4", False), {"driver": "470.82.01", "cuda": "11.4"})
    assert len(old_driver) == 1 and "driver >= 525.60" in old_driver[0][0]
    cuda13 = known_bad_combinations(good, ("13.0", False), {"driver": "570.10", "cuda": "12.8"})
    assert "driver >= 580.0" in cuda13[0][0]
    numpy2 = known_bad_combinations({**good, "torch": "2.2.1"}, (None, False), None)
    assert "NumPy 1" in numpy2[0][0] and "numpy<2" in numpy2[0][1]
    assert "GLM-4-0414" in known_bad_combinations({**good, "transformers": "4.40.0"}, (None, False), None)[0][0]


def test_model_fit_verdicts() -> None:
    e = estimate(arch_for("glm-4-9b-0414"), max_model_len=8192, max_num_seqs=16)
    fixed = e.weight_bytes + e.activation_bytes + e.overhead_bytes
    per_seq = 8192 * 40 * 1024
    assert _fit_verdict("m", e, "gpu", fixed + 16 * per_seq).status == "PASS"
    warn = _fit_verdict("m", e, "gpu", fixed + 5.5 * per_seq)
    assert warn.status == "WARN" and "~5 full-length" in warn.detail
    fail = _fit_verdict("m", e, "gpu", fixed + 0.5 * per_seq)
    assert fail.status == "FAIL" and "out of memory" in fail.detail and "int8" in (fail.fix or "")
    assert e.total_bytes < 24 * GiB


def test_config_errors_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  prot: 1\n")
    ctx = DoctorContext(load_settings(None, None, {}), None, bad)
    check = next(check_config(ctx))
    assert check.status == "FAIL" and "did you mean 'port'" in check.detail


def test_cli_exit_code_and_json(busy_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_STORE__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUTOGLM_SERVER__GRPC_PORT", "0")
    monkeypatch.setenv("AUTOGLM_SERVER__PORT", str(busy_port))
    res = CliRunner().invoke(app, ["doctor", "--json"])
    assert res.exit_code == 1, res.output
    report = json.loads(res.output)
    assert report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]}[f"port {busy_port}"] == "FAIL"
    monkeypatch.setenv("AUTOGLM_SERVER__PORT", "0")
    ok = CliRunner().invoke(app, ["doctor", "--model", "glm-4-9b-0414"])
    names = [c.name for c in run_doctor(load_settings(None, {"server": {"port": 0}}, {}), model="glm-4-9b-0414")]
    assert "model glm-4-9b-0414" in names and "python" in names and "packages" in names
    assert "model glm-4-9b-0414" in ok.output
