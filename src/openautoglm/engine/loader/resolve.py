"""Turn ``ModelConfig.model`` into a local checkpoint directory: a path, the demo model, a built-in named config
(architecture only, for dummy loads), or a hub id."""

from __future__ import annotations

import re
from pathlib import Path

from openautoglm.config.settings import DEMO_MODEL, ModelConfig
from openautoglm.engine.models.named_configs import is_named_config, named_config_names
from openautoglm.protocol.errors import ModelLoadError

# What Open-AutoGLM needs from a hub snapshot; *.bin / *.pt / *.gguf weights are never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model in (".", "..") or model.count("/") > 1


def resolve_checkpoint(cfg: ModelConfig) -> Path:
    """The local directory holding the checkpoint that ``cfg.model`` names, downloading a hub id if needed."""
    model = cfg.model
    if model == DEMO_MODEL:
        from openautoglm.engine.loader.demo import ensure_demo_model

        # download_dir, when set, holds the demo model too; otherwise the demo module's default cache does.
        return ensure_demo_model(Path(cfg.download_dir) if cfg.download_dir else None)
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if is_named_config(model):
        return _named(cfg)
    if path.exists():
        raise ModelLoadError(f"model {model!r} is a file; give the checkpoint directory holding config.json")
    if _looks_like_path(model) or not _HUB_ID.fullmatch(model):
        raise ModelLoadError(
            f"model {model!r}: no such checkpoint directory, and it is not a hub id of the form 'org/name'"
        )
    return _from_hub(model, cfg.revision, cfg.download_dir)


def _named(cfg: ModelConfig) -> Path:
    if cfg.load_format != "dummy":
        raise ModelLoadError(
            f"model {cfg.model!r} is a built-in named config (architecture only, no weights): use load_format "
            "'dummy' (--load-format dummy) to run it with random weights, or give a checkpoint directory or "
            f"hub id; built-in names: {', '.join(named_config_names())}"
        )
    from openautoglm.engine.loader.named import ensure_named_config_dir

    return ensure_named_config_dir(cfg.model, Path(cfg.download_dir) if cfg.download_dir else None)


def _from_hub(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(constants.HF_HUB_OFFLINE)
    at = f" at revision {revision!r}" if revision else ""
    fetch = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=HUB_PATTERNS,
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as exc:
        how = (
            f"fetch it on a machine with network access (`{fetch}`, same HF_HOME) or unset HF_HUB_OFFLINE"
            if offline
            else f"check the network connection, or fetch it with `{fetch}`"
        )
        mode = "offline mode (HF_HUB_OFFLINE=1): " if offline else ""
        raise ModelLoadError(f"model {repo_id!r}{at}: {mode}no complete cached snapshot; {how}") from exc
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise ModelLoadError(
            f"model {repo_id!r}{at}: not available on the hub ({type(exc).__name__}); check the id and "
            "revision, and for a gated or private model log in with `huggingface-cli login` (or set HF_TOKEN)"
        ) from exc
    except HFValidationError as exc:
        raise ModelLoadError(f"model {repo_id!r}: not a valid hub id ({exc})") from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"model {repo_id!r}{at}: download failed: {exc}") from exc
    return Path(snapshot)
