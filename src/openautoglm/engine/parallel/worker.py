"""The process of one tensor-parallel rank above 0: its shard of the model, its KV cache, and a loop that runs
every command rank 0 sends (``workers.py`` tells the whole protocol).

Commands, pickled tuples on the command pipe: ``("runner", kwargs)`` builds the runner (KV cache of rank 0's
agreed block count), ``("capture", max_batch)`` captures the decode graphs, ``("step", step)`` runs one step on
the inputs rank 0 broadcasts, ``("dummy", size)`` / ``("replay", size)`` replay a graph for a benchmark, and
``("stop",)`` ends the process. Reports on the report pipe: ``("started", None)``, ``("loaded", blocks or
None)``, or ``("failed", exception)`` before the process exits with status 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from openautoglm.engine.parallel.context import connect
from openautoglm.engine.parallel.workers import WorkerSpec
from openautoglm.engine.platform import configure_launches
from openautoglm.protocol.errors import EngineError, portable_error

logger = logging.getLogger(__name__)

# On a GPU, poll the command pipe this long before sleeping in recv: decode steps come every few milliseconds,
# and waking from a blocking read costs tens of microseconds every step.
SPIN_S = 0.02


def worker_main(spec: WorkerSpec, commands: Connection, reports: Connection) -> None:
    """Entry point of a worker process (spawned by ``WorkerGroup.start``)."""
    # Ctrl-C reaches the whole process group; rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _exit_with_parent(spec.parent_pid)
    try:
        reports.send(("started", None))
        runner = _build(spec, commands, reports)
        if runner is not None:  # else rank 0 gave up starting (its own start-up failed)
            _serve(runner, commands, spin=runner.device.type == "cuda")
    except (EOFError, BrokenPipeError):
        os._exit(0)  # rank 0 is gone: nothing left to follow
    except BaseException as exc:  # reported to rank 0, which raises it
        logger.exception("Open-AutoGLM tensor-parallel rank %d failed", spec.rank)
        with contextlib.suppress(OSError):  # rank 0 already gone
            reports.send(("failed", portable_error(exc)))
        os._exit(1)
    # A plain exit; os._exit skips the interpreter's teardown, where NCCL's and CUDA's destructors could wait on
    # peers that are already gone.
    os._exit(0)


def _build(spec: WorkerSpec, commands: Connection, reports: Connection) -> Any:
    from openautoglm.engine.loader import load_model
    from openautoglm.engine.runner import ModelRunner

    config = spec.config
    device = torch.device(spec.device)
    dtype = getattr(torch, spec.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_launches(config.programmatic_launch, device)
    torch.manual_seed(config.model.seed)
    tp = connect(spec.rank, spec.size, spec.port, device, custom_all_reduce=not config.disable_custom_all_reduce)
    loaded = load_model(config.model, device, dtype, tp)
    reports.send(("loaded", _kv_capacity(spec, loaded.arch, device, dtype)))
    kind, *args = pickle.loads(commands.recv_bytes())
    if kind == "stop":
        return None
    if kind != "runner":
        raise EngineError(f"tensor-parallel rank {spec.rank}: expected the runner's settings, got {kind!r}")
    kwargs = args[0]
    backend = _backend(kwargs.pop("backend"), device)
    return ModelRunner(loaded.model, loaded.arch, backend, device=device, dtype=dtype, tp=tp, **kwargs)


def _kv_capacity(spec: WorkerSpec, arch: Any, device: torch.device, dtype: torch.dtype) -> int | None:
    """KV blocks this rank has room for, when memory decides it (a GPU, no fixed budget); else None."""
    from openautoglm.engine.runner import kv_cache_budget_bytes, kv_cache_bytes_per_block

    cache = spec.config.cache
    if device.type != "cuda" or cache.num_blocks is not None or cache.kv_cache_memory_bytes is not None:
        return None
    per_block = kv_cache_bytes_per_block(arch, cache.block_size, dtype, spec.size)
    return max(0, kv_cache_budget_bytes(device, cache.gpu_memory_utilization) // per_block)


def _backend(name: str, device: torch.device) -> Any:
    """The attention backend rank 0 chose, by name (every rank runs the same kernels)."""
    if name == "triton":
        from openautoglm.engine.attention.triton_paged import TritonPagedAttentionBackend

        return TritonPagedAttentionBackend(device)
    from openautoglm.engine.attention.reference import ReferenceAttentionBackend

    return ReferenceAttentionBackend()


def _serve(runner: Any, commands: Connection, spin: bool) -> None:
    while True:
        message = pickle.loads(_receive(commands, spin))
        kind = message[0]
        if kind == "step":
            runner.follow(message[1])
        elif kind == "capture":
            runner.capture_graphs(message[1])
        elif kind == "dummy":
            runner.dummy_decode_graph(message[1])
        elif kind == "replay":
            runner.replay_graph(message[1])
        elif kind == "stop":
            return
        else:
            raise EngineError(f"tensor-parallel worker: unknown command {kind!r}")


def _receive(conn: Connection, spin: bool) -> bytes:
    if spin and not conn.poll():
        deadline = time.perf_counter() + SPIN_S
        while not conn.poll() and time.perf_counter() < deadline:
            pass
    return conn.recv_bytes()


def _exit_with_parent(parent_pid: int) -> None:
    """End this process when rank 0's is gone, even if a collective waiting for it never returns."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="autoglm-tp-parent", daemon=True).start()
