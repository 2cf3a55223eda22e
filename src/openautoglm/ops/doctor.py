"""``autoglm doctor``: is this machine ready to serve? Each check says PASS, WARN or FAIL and how to fix it.

The checks cover what most failed GLM deployments trip on: the wrong Python environment, mismatched PyTorch /
CUDA / driver, a GPU too small for the model, a port already taken, unreachable Redis or database, an
unwritable data directory, a full disk under the model cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from openautoglm.config.settings import DEMO_MODEL, Settings
from openautoglm.ops.doctor_env import known_bad_combinations, nvidia_smi, package_versions
from openautoglm.ops.estimate import Estimate
from openautoglm.protocol.errors import AutoGLMError

Status = Literal["PASS", "WARN", "FAIL"]
GiB = 1 << 30
REQUIRED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "pydantic", "pydantic-settings",
                     "fastapi", "uvicorn", "sqlalchemy", "grpcio", "prometheus-client", "pyyaml")  # fmt: skip
OPTIONAL_PACKAGES = ("numpy", "triton", "redis", "psycopg", "xgrammar")
MIN_CACHE_FREE = 20 * GiB


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(slots=True)
class DoctorContext:
    settings: Settings
    model: str | None  # the model to size, None: none named (demo)
    config_file: Path | None


def _ok(name: str, detail: str) -> Check:
    return Check(name, "PASS", detail)


# ---- environment ---------------------------------------------------------------------------------------


def check_python(ctx: DoctorContext) -> Iterator[Check]:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 11):
        yield Check("python", "FAIL", f"Python {version} at {sys.executable}", "Open-AutoGLM needs Python >= 3.11")
    else:
        yield _ok("python", f"Python {version} at {sys.executable}")
    script = shutil.which("autoglm")
    if script is None:
        return
    first = Path(script).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
    interpreter = first.removeprefix("#!").strip()
    if interpreter and Path(interpreter).resolve().parent != Path(sys.executable).resolve().parent:
        yield Check("environment", "WARN", f"`autoglm` on PATH runs {interpreter}, not this {sys.executable}",
                    "activate the environment Open-AutoGLM is installed in, or run `python -m "
                    "openautoglm.cli.main` with its Python (the usual cause of 'No module named ...')")  # fmt: skip


def check_packages(ctx: DoctorContext) -> Iterator[Check]:
    versions = package_versions((*REQUIRED_PACKAGES, *OPTIONAL_PACKAGES))
    missing = [p for p in REQUIRED_PACKAGES if versions.get(p) is None]
    listed = ", ".join(f"{p} {v}" for p, v in versions.items() if v)
    if missing:
        yield Check("packages", "FAIL", f"missing: {', '.join(missing)}",
                    f"pip install -c constraints.txt {' '.join(missing)} (in {sys.prefix})")  # fmt: skip
    else:
        yield _ok("packages", listed)
    for problem, fix in known_bad_combinations(versions, _torch_cuda(), nvidia_smi()):
        yield Check("compatibility", "FAIL", problem, fix)


def _torch_cuda() -> tuple[str | None, bool]:
    """(CUDA runtime version PyTorch was built with, whether it sees a device)."""
    import torch

    return torch.version.cuda, torch.cuda.is_available()


def check_cuda(ctx: DoctorContext) -> Iterator[Check]:
    import torch

    from openautoglm.engine.platform import fast_path_support

    smi = nvidia_smi()
    built, available = torch.version.cuda, torch.cuda.is_available()
    device = ctx.settings.engine.model.device
    wants_gpu = device.startswith("cuda") or (device == "auto" and smi is not None)
    if not available:
        status: Status = "FAIL" if device.startswith("cuda") else ("WARN" if smi else "PASS")
        why = "this PyTorch is a CPU build" if built is None else f"PyTorch (CUDA {built}) sees no device"
        fix = None
        if smi is not None:
            fix = f"install a CUDA build of PyTorch that driver {smi['driver']} supports"
        elif device.startswith("cuda"):
            fix = "no NVIDIA driver found: install it, or set engine.model.device to 'cpu'"
        yield Check("cuda", status, f"{why}; Open-AutoGLM runs on the CPU (reference path)", fix)
        return
    driver = smi["driver"] if smi else "unknown"
    yield _ok("cuda", f"PyTorch CUDA {built}, driver {driver}, {torch.cuda.device_count()} GPU(s)")
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        free, total = torch.cuda.mem_get_info(index)
        allowed, message = fast_path_support(f"cuda:{index}")
        detail = f"{name}, compute capability {major}.{minor}, {free / GiB:.1f} of {total / GiB:.1f} GiB free"
        status = "PASS" if allowed else "WARN"
        yield Check(
            f"gpu {index}",
            status,
            detail if allowed else f"{detail}; {message}",
            None if allowed else "a GPU of compute capability >= 7.5 with triton runs the fast path",
        )
        if free < 0.5 * total and wants_gpu:
            yield Check(f"gpu {index} memory", "WARN", f"{(total - free) / GiB:.1f} GiB already in use",
                        "other processes hold GPU memory (nvidia-smi lists them): stop them or pick another "
                        "GPU with CUDA_VISIBLE_DEVICES")  # fmt: skip


def check_model_fits(ctx: DoctorContext) -> Iterator[Check]:
    import torch

    from openautoglm.ops.estimate import arch_for, estimate

    if ctx.model is None:
        return
    m, s, c = ctx.settings.engine.model, ctx.settings.engine.scheduler, ctx.settings.engine.cache
    try:
        arch = arch_for(ctx.model, revision=m.revision)
    except AutoGLMError as exc:
        yield Check("model", "WARN", f"cannot read {ctx.model!r}'s config.json: {exc}", "check the path or hub id")
        return
    on_gpu = torch.cuda.is_available() and m.device != "cpu"
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    e = estimate(arch, model=ctx.model, dtype=dtype, quantization=m.quantization, max_model_len=m.max_model_len,
                 max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                 block_size=c.block_size, overhead_bytes=GiB if on_gpu else 0)  # fmt: skip
    if on_gpu:
        index = int(m.device.split(":")[1]) if ":" in m.device else 0
        free = torch.cuda.mem_get_info(index)[0]
        where, budget = f"GPU {index} ({free / GiB:.1f} GiB free)", free * c.gpu_memory_utilization
    else:
        where, budget = "this machine's available RAM", float(_meminfo().get("MemAvailable", 0))
    yield _fit_verdict(f"model {ctx.model}", e, where, budget)


def _fit_verdict(name: str, e: Estimate, where: str, budget: float) -> Check:
    """FAIL when not even one full-length sequence fits beside the weights; WARN when fewer than max_num_seqs."""
    per_seq = e.kv_bytes // e.max_num_seqs
    seqs = int((budget - (e.weight_bytes + e.activation_bytes + e.overhead_bytes)) // per_seq)
    summary = (f"weights {e.weight_bytes / GiB:.1f} GiB + KV {e.kv_bytes / GiB:.1f} GiB for {e.max_num_seqs} x "
               f"{e.max_model_len} tokens = {e.total_bytes / GiB:.1f} GiB on {where}")  # fmt: skip
    if seqs < 1:
        return Check(name, "FAIL", f"does not fit: {summary} (out of memory at load)",
                     "use --quantization int8 (fp8 on Hopper), a lower max_model_len, tensor parallelism over "
                     "more GPUs, or a larger GPU (`autoglm estimate` lists which fit)")  # fmt: skip
    if seqs < e.max_num_seqs:
        return Check(name, "WARN", f"fits ~{seqs} full-length sequences at once, not {e.max_num_seqs}: {summary}",
                     "lower scheduler.max_num_seqs or max_model_len, or quantize, to avoid preemption")  # fmt: skip
    return _ok(name, f"fits: {summary}")


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return out
    return out


def check_host(ctx: DoctorContext) -> Iterator[Check]:
    cores = os.cpu_count() or 0
    mem = _meminfo()
    total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
    detail = f"{cores} CPU cores, {avail / GiB:.1f} of {total / GiB:.1f} GiB RAM available"
    if cores < 2 or (total and avail < 2 * GiB):
        yield Check("host", "WARN", detail, "Open-AutoGLM's server wants at least 2 cores and a few GiB of RAM")
    else:
        yield _ok("host", detail)


def model_cache_dir(settings: Settings) -> Path:
    """Where hub downloads land: engine.model.download_dir, else huggingface_hub's cache (HF_HOME / HF_HUB_CACHE)."""
    if settings.engine.model.download_dir:
        return Path(settings.engine.model.download_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(ctx: DoctorContext) -> Iterator[Check]:
    cache = model_cache_dir(ctx.settings)
    free = shutil.disk_usage(_existing(cache)).free
    need = MIN_CACHE_FREE
    if ctx.model is not None and not Path(ctx.model).expanduser().is_dir():
        from openautoglm.ops.estimate import arch_for, weight_bytes

        try:
            need = max(need, weight_bytes(arch_for(ctx.model), "bfloat16") + GiB)
        except AutoGLMError:  # sizing is best effort; the model check reports the cause
            need = MIN_CACHE_FREE
    detail = f"model cache {cache} (HF_HOME={os.environ.get('HF_HOME', 'unset')}): {free / GiB:.1f} GiB free"
    if free < need:
        yield Check("disk", "WARN", f"{detail}, {need / GiB:.0f} GiB wanted",
                    "free space there, or point HF_HOME / engine.model.download_dir at a larger disk")  # fmt: skip
    else:
        yield _ok("disk", detail)


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(ctx: DoctorContext) -> Iterator[Check]:
    srv = ctx.settings.server
    for label, port in (("http", srv.port), ("grpc", srv.grpc_port)):
        if port == 0:
            continue
        if port_free(srv.host, port):
            yield _ok(f"port {port}", f"{label} port {srv.host}:{port} is free")
        else:
            yield Check(f"port {port}", "FAIL", f"{label} port {srv.host}:{port} is in use (or not allowed)",
                        f"find the holder with `ss -ltnp 'sport = :{port}'`, stop it, or serve on another port "
                        "(--port / --grpc-port)")  # fmt: skip


def check_data_dir(ctx: DoctorContext) -> Iterator[Check]:
    path = ctx.settings.store.data_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        yield Check(
            "data dir",
            "FAIL",
            f"{path} is not writable: {exc.strerror}",
            "fix its owner/mode, or set store.data_dir (AUTOGLM_STORE__DATA_DIR) to a writable volume",
        )
        return
    yield _ok("data dir", f"{path} is writable")


def check_services(ctx: DoctorContext) -> Iterator[Check]:
    store = ctx.settings.store
    if store.redis_url is not None:
        yield _redis(store.redis_url.get_secret_value())
    if store.url is not None:
        yield _database(store.database_url())


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a database URL (redis://): keep the scheme, hide the rest
        return url.split(":", 1)[0] + "://…"


def _redis(url: str) -> Check:
    try:
        import redis
    except ImportError:
        return Check("redis", "FAIL", "store.redis_url is set but the redis package is missing", "pip install redis")
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", "FAIL", f"{_redact(url)} unreachable: {exc}",
                     "start Redis or fix store.redis_url (host, port, password, TLS: rediss://)")  # fmt: skip
    finally:
        client.close()
    return _ok("redis", f"{_redact(url)} answers PING")


def _database(url: str) -> Check:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    args = {"connect_timeout": 3} if url.startswith("postgresql") else {}
    engine = create_engine(url, connect_args=args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, ImportError) as exc:
        return Check(
            "database",
            "FAIL",
            f"{_redact(url)} unreachable: {str(exc).splitlines()[0]}",
            "start the database or fix store.url; then `autoglm db upgrade` creates the tables",
        )
    finally:
        engine.dispose()
    return _ok("database", f"{_redact(url)} accepts connections")


def check_config(ctx: DoctorContext) -> Iterator[Check]:
    if ctx.config_file is None:
        return
    from openautoglm.ops.config_check import check_file

    report = check_file(ctx.config_file)
    if report.ok:
        warnings = len(report.issues)
        yield Check("config", "WARN" if warnings else "PASS", f"{ctx.config_file}: valid, {warnings} warning(s)",
                    f"autoglm config validate {ctx.config_file}" if warnings else None)  # fmt: skip
    else:
        first = report.errors[0].format(report.file)
        yield Check("config", "FAIL", f"{len(report.errors)} error(s); first: {first}",
                    f"autoglm config validate {ctx.config_file} lists them all")  # fmt: skip


CHECKS: tuple[Callable[[DoctorContext], Iterator[Check]], ...] = (
    check_python, check_packages, check_config, check_cuda, check_model_fits, check_host, check_disk,
    check_ports, check_data_dir, check_services,
)  # fmt: skip


def run_doctor(settings: Settings, *, model: str | None = None, config_file: Path | None = None) -> list[Check]:
    named = model or (settings.engine.model.model if settings.engine.model.model != DEMO_MODEL else None)
    ctx = DoctorContext(settings, named, config_file)
    return [c for check in CHECKS for c in check(ctx)]


def report_dict(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == "FAIL" for c in checks), "checks": [asdict(c) for c in checks]}
