"""The Settings tree: YAML < environment < overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from openautoglm.config.settings import load_settings
from openautoglm.protocol.errors import ConfigError


def test_precedence_yaml_env_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "autoglm.yaml"
    cfg.write_text("engine:\n  cache:\n    block_size: 8\n  scheduler:\n    max_num_seqs: 4\n    policy: priority\n")
    env = {"AUTOGLM_ENGINE__SCHEDULER__MAX_NUM_SEQS": "12", "UNRELATED": "x"}
    s = load_settings(cfg, {"engine": {"model": {"model": "/ckpt"}}}, environ=env)
    assert s.engine.cache.block_size == 8  # from YAML
    assert s.engine.scheduler.max_num_seqs == 12  # env beats YAML
    assert s.engine.scheduler.policy == "priority"
    assert s.engine.model.model == "/ckpt"  # overrides beat both
    s2 = load_settings(cfg, {"engine": {"scheduler": {"max_num_seqs": 3}}}, environ=env)
    assert s2.engine.scheduler.max_num_seqs == 3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("engine:\n  cache:\n    block_size: 0\n", "engine.cache.block_size"),
        ("engine:\n  cache:\n    blok_size: 16\n", "engine.cache.blok_size"),
        ("engine:\n  scheduler:\n    policy: lifo\n", "engine.scheduler.policy"),
        ("- just\n- a list\n", "mapping"),
        ("engine: [unclosed\n", "not valid YAML"),
        (
            "engine:\n  model:\n    max_model_len: 4096\n  scheduler:\n    enable_chunked_prefill: false\n"
            "    max_num_batched_tokens: 1024\n",
            "max_num_batched_tokens",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert needle in info.value.message


def test_missing_file_and_bad_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match=r"engine\.cache\.block_size"):
        load_settings(environ={"AUTOGLM_ENGINE__CACHE__BLOCK_SIZE": "many"})
