"""Semantic rules across settings: what each field's own validation cannot see.

Each rule takes the validated Settings and yields ``Finding``s; ``semantic_issues`` places them on the file's
lines. The same rules run at ``serve`` start on the final settings (file, environment and flags merged).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from openautoglm.config.settings import Settings
from openautoglm.ops.config_check import Issue, Severity, dotted
from openautoglm.ops.yaml_positions import PositionedYaml

P = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    path: P
    message: str
    hint: str | None = None


Rule = Callable[[Settings, Path], Iterator[Finding]]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _ports(s: Settings, base: Path) -> Iterator[Finding]:
    srv = s.server
    if srv.port and srv.port == srv.grpc_port:
        yield Finding("error", ("server", "grpc_port"), f"HTTP and gRPC both use port {srv.port}",
                      "give server.grpc_port another port, or 0 to turn gRPC off")  # fmt: skip
    for name in ("port", "grpc_port"):
        port = getattr(srv, name)
        if 0 < port < 1024:
            yield Finding("warning", ("server", name), f"port {port} is privileged",
                          "Open-AutoGLM runs as a non-root user in its images: use a port >= 1024")  # fmt: skip


def _scheduler(s: Settings, base: Path) -> Iterator[Finding]:
    sch, cache, model = s.engine.scheduler, s.engine.cache, s.engine.model
    if sch.max_num_batched_tokens < cache.block_size:
        yield Finding("error", ("engine", "scheduler", "max_num_batched_tokens"),
                      f"{sch.max_num_batched_tokens} is below engine.cache.block_size ({cache.block_size})",
                      "a step must fill at least one KV block: raise it or lower the block size")  # fmt: skip
    if sch.max_num_seqs > sch.max_num_batched_tokens:
        yield Finding("warning", ("engine", "scheduler", "max_num_seqs"),
                      f"{sch.max_num_seqs} sequences cannot all decode in one step of "
                      f"{sch.max_num_batched_tokens} tokens", "raise max_num_batched_tokens")  # fmt: skip
    limit = _max_positions(model.model, base)
    if limit is not None and model.max_model_len is not None and model.max_model_len > limit:
        yield Finding("error", ("engine", "model", "max_model_len"),
                      f"{model.max_model_len} exceeds the model's max_position_embeddings ({limit})",
                      f"set it to at most {limit}")  # fmt: skip
    if cache.num_blocks is not None and model.max_model_len is not None:
        need = math.ceil(model.max_model_len / cache.block_size)
        if cache.num_blocks < need:
            yield Finding("error", ("engine", "cache", "num_blocks"),
                          f"{cache.num_blocks} blocks of {cache.block_size} tokens cannot hold one sequence of "
                          f"max_model_len {model.max_model_len} ({need} blocks)", "raise num_blocks")  # fmt: skip


def _max_positions(model: str, base: Path) -> int | None:
    """The context limit of a named config or a local checkpoint's config.json; None when not known here."""
    from openautoglm.engine.models.named_configs import NAMED_CONFIGS

    if model in NAMED_CONFIGS:
        return int(NAMED_CONFIGS[model]["max_position_embeddings"])
    config = (base / model / "config.json") if not Path(model).is_absolute() else Path(model) / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text()).get("max_position_embeddings", 0)) or None
        except (OSError, ValueError):
            return None
    return None


def _device(s: Settings, base: Path) -> Iterator[Finding]:
    m = s.engine.model
    path = ("engine", "model", "quantization")
    if s.engine.attention_backend == "triton" and m.device == "cpu":
        yield Finding("error", ("engine", "attention_backend"), "'triton' needs a CUDA GPU; device is 'cpu'",
                      "use attention_backend 'auto' or 'reference'")  # fmt: skip
    if m.quantization != "fp8":
        return
    if m.dtype in ("float16", "float32"):
        yield Finding("error", ("engine", "model", "dtype"), f"quantization 'fp8' needs bfloat16, dtype is {m.dtype!r}",
                      "set engine.model.dtype to 'bfloat16' or 'auto'")  # fmt: skip
    from openautoglm.engine.platform import fp8_decision

    if m.device == "cpu":
        yield Finding("error", path, fp8_decision("cpu", None, None) or "")
        return
    import torch

    if not torch.cuda.is_available():
        yield Finding("warning", path, "quantization 'fp8' needs a Hopper GPU (compute capability 9.0); no CUDA "
                      "device is visible here, so this could not be checked")  # fmt: skip
        return
    index = int(m.device.split(":")[1]) if ":" in m.device else 0
    reason = fp8_decision(m.device, torch.cuda.get_device_name(index),
                          tuple(torch.cuda.get_device_capability(index)))  # type: ignore[arg-type]  # fmt: skip
    if reason:
        yield Finding("error", path, reason)


def _exposed(path: Path, read: int, through: int) -> bool:
    """Readable by a class of users (others, or the group): the file has ``read`` and every directory above it
    has ``through`` (a 0644 key inside a 0700 directory is safe)."""
    if not path.stat().st_mode & read:
        return False
    return all(p.stat().st_mode & through for p in path.resolve().parents)


def _file(where: P, name: str | None, base: Path, *, secret: bool = False) -> Iterator[Finding]:
    if not name:
        return
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        yield Finding("error", where, f"file {name!r} does not exist", "check the path (relative paths start at "
                      "the working directory)")  # fmt: skip
    elif not os.access(path, os.R_OK):
        yield Finding("error", where, f"file {name!r} is not readable by this user", "fix its owner or mode")
    elif secret and _exposed(path, stat.S_IROTH, stat.S_IXOTH):
        yield Finding("error", where, f"secret file {name!r} is readable by every user",
                      f"chmod 600 {name}")  # fmt: skip
    elif secret and _exposed(path, stat.S_IRGRP, stat.S_IXGRP):
        yield Finding("warning", where, f"secret file {name!r} is readable by its group", f"chmod 600 {name}")


def _files(s: Settings, base: Path) -> Iterator[Finding]:
    tls, auth = s.gateway.tls, s.gateway.auth
    yield from _file(("gateway", "tls", "cert_file"), tls.cert_file, base)
    yield from _file(("gateway", "tls", "key_file"), tls.key_file, base, secret=True)
    yield from _file(("gateway", "tls", "client_ca_file"), tls.client_ca_file, base)
    yield from _file(("gateway", "auth", "jwt", "jwks_file"), auth.jwt.jwks_file, base)
    if auth.secret_file and Path(auth.secret_file).expanduser().exists():  # created on first start otherwise
        yield from _file(("gateway", "auth", "secret_file"), auth.secret_file, base, secret=True)
    for i, dep in enumerate(s.router.deployments):
        for j, b in enumerate(dep.backends):
            yield from _file(("router", "deployments", i, "backends", j, "api_key_file"), b.api_key_file, base,
                             secret=True)  # fmt: skip


def _router(s: Settings, base: Path) -> Iterator[Finding]:
    r = s.router
    if r.enabled and not r.deployments:
        yield Finding("warning", ("router", "enabled"), "the router is on but has no deployments",
                      "add router.deployments or turn the router off")  # fmt: skip
    if r.retry.backoff_base_s > r.retry.backoff_max_s:
        yield Finding("error", ("router", "retry", "backoff_base_s"),
                      f"{r.retry.backoff_base_s}s is above backoff_max_s ({r.retry.backoff_max_s}s)")  # fmt: skip
    if r.health.timeout_s >= r.health.interval_s:
        yield Finding("error", ("router", "health", "timeout_s"),
                      f"probe timeout {r.health.timeout_s}s is not below the interval {r.health.interval_s}s",
                      "probes would overlap: lower timeout_s or raise interval_s")  # fmt: skip
    if r.analysis.interval_s > r.analysis.window_s:
        yield Finding(
            "warning",
            ("router", "analysis", "interval_s"),
            f"analysis every {r.analysis.interval_s}s over a {r.analysis.window_s}s window skips data",
        )
    for i in range(len(r.deployments)):
        yield from _deployment(s, i)


def _deployment(s: Settings, i: int) -> Iterator[Finding]:
    dep, retry = s.router.deployments[i], s.router.retry
    at: P = ("router", "deployments", i)
    versions = {b.version for b in dep.backends}
    dynamic = dep.discovery is not None
    if not dynamic and sum(b.weight for b in dep.backends if b.version == dep.stable_version) <= 0:
        yield Finding("error", (*at, "stable_version"), f"no backend of deployment {dep.model!r} carries the "
                      f"stable version {dep.stable_version!r}; versions present: {sorted(versions)}")  # fmt: skip
    if dep.canary is not None:
        if dep.canary.version == dep.stable_version:
            yield Finding("error", (*at, "canary", "version"), "the canary version equals the stable version")
        elif not dynamic and dep.canary.version not in versions:
            yield Finding("error", (*at, "canary", "version"), f"no backend carries canary version "
                          f"{dep.canary.version!r}; versions present: {sorted(versions)}")  # fmt: skip
    for j, b in enumerate(dep.backends):
        where = (*at, "backends", j)
        if b.connect_timeout_s > b.first_byte_timeout_s:
            yield Finding(
                "warning",
                (*where, "connect_timeout_s"),
                f"{b.connect_timeout_s}s exceeds first_byte_timeout_s ({b.first_byte_timeout_s}s)",
            )
        worst = retry.max_attempts * (b.connect_timeout_s + b.first_byte_timeout_s)
        worst += (retry.max_attempts - 1) * retry.backoff_max_s
        if worst > retry.default_deadline_s:
            yield Finding("warning", (*where, "first_byte_timeout_s"),
                          f"{retry.max_attempts} attempts of up to {b.connect_timeout_s + b.first_byte_timeout_s}s "
                          f"plus backoff ({worst:g}s) outlast router.retry.default_deadline_s "
                          f"({retry.default_deadline_s:g}s): the deadline cuts retries short",
                          "lower the timeouts or max_attempts, or raise the deadline")  # fmt: skip


def _shared(s: Settings, base: Path) -> Iterator[Finding]:
    store, auth = s.store, s.gateway.auth
    shared_db = store.url is not None and not store.database_url().startswith("sqlite")
    limits = getattr(s.gateway, "limits", None)
    if limits is not None and getattr(limits, "backend", None) == "redis" and store.redis_url is None:
        yield Finding("error", ("gateway", "limits", "backend"), "rate limits in Redis need store.redis_url",
                      "set store.redis_url (or AUTOGLM_STORE__REDIS_URL)")  # fmt: skip
    if shared_db and store.redis_url is None:
        yield Finding("warning", ("store", "redis_url"), "a shared database means several replicas, but without "
                      "Redis brute-force blocks, limits and key revocations stay per replica",
                      "set store.redis_url (or AUTOGLM_STORE__REDIS_URL)")  # fmt: skip
    if shared_db and auth.required and auth.secret is None and auth.secret_file is None:
        yield Finding(
            "warning",
            ("gateway", "auth", "secret"),
            "with several replicas each one would make its "
            "own server secret, and keys created on one would not verify on another",
            "give every replica the same AUTOGLM_GATEWAY__AUTH__SECRET or a shared secret_file",
        )
    if not auth.required and s.server.host not in LOOPBACK:
        yield Finding("error", ("gateway", "auth", "required"), f"authentication is off on {s.server.host!r}",
                      "Open-AutoGLM serves without auth on loopback addresses only")  # fmt: skip


def _inline_secrets(s: Settings, doc: PositionedYaml | None) -> Iterator[Finding]:
    if doc is None:
        return
    secrets = (
        (("gateway", "auth", "secret"), "AUTOGLM_GATEWAY__AUTH__SECRET"),
        (("store", "url"), "AUTOGLM_STORE__URL"),
        (("store", "redis_url"), "AUTOGLM_STORE__REDIS_URL"),
    )
    for path, env in secrets:
        value = doc.data
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and (path[-1] == "secret" or "@" in value):
            yield Finding("warning", path, "a secret is written in the configuration file",
                          f"pass it as {env} from a secret store instead")  # fmt: skip


RULES: tuple[Rule, ...] = (_ports, _scheduler, _device, _files, _router, _shared)


def findings(settings: Settings, base_dir: Path | None = None) -> list[Finding]:
    base = base_dir or Path.cwd()
    return [f for rule in RULES for f in rule(settings, base)]


def semantic_issues(
    settings: Settings, doc: PositionedYaml | None = None, *, base_dir: Path | None = None
) -> list[Issue]:
    out = []
    for f in [*findings(settings, base_dir), *_inline_secrets(settings, doc)]:
        pos = doc.locate(f.path)[1] if doc is not None else None
        line, column = pos if pos else (None, None)
        out.append(Issue(f.severity, dotted(f.path), f.message, line, column, f.hint))
    return out
