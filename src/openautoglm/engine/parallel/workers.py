"""Rank 0's handle on tensor-parallel ranks 1..N-1: processes that build their shard and follow every step.

The engine's own process is rank 0 (it schedules, samples and talks to users). ``WorkerGroup.start`` spawns one
process per other rank (the spawn context: a fresh interpreter, never a fork of one holding CUDA state), each
pinned to its GPU. Start-up, in lockstep with rank 0: join the group, load the shard, report how many KV blocks
fit (every rank then allocates the smallest count), build the runner, capture the same CUDA graphs. Then each
step rank 0 sends the step's shape down a pipe (``send``) and broadcasts its input buffer; every rank runs the
same forward pass, the collectives inside it keeping them together.

Failure: a watcher thread waits on the workers' exit and report pipes. When a worker dies or reports an error,
it records why and aborts rank 0's side of the group, so a collective waiting for the dead rank returns; the
next step (``guard``, ``check``) raises ``TensorParallelError`` naming the rank and its exit: the engine stops
with that error instead of hanging. Workers exit when told to (``close``, also run when the group is garbage
collected or the interpreter exits), when their command pipe closes, or when rank 0's process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

import torch

from openautoglm.config.settings import EngineConfig
from openautoglm.engine.parallel.context import TensorParallel, connect, master_store, set_collective_env
from openautoglm.engine.parallel.sharding import check_tensor_parallel
from openautoglm.engine.platform import dtype_name
from openautoglm.protocol.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_PICKLE = pickle.HIGHEST_PROTOCOL
START_TIMEOUT_S = 300.0  # a fresh interpreter importing torch on a loaded host can be slow
STOP_TIMEOUT_S = 15.0
ABORT_TIMEOUT_S = 30.0


class TensorParallelError(EngineError):
    """A tensor-parallel rank failed or exited: no step can run without it, so the engine stops."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process starts from."""

    config: EngineConfig
    rank: int
    size: int
    port: int  # rank 0's rendezvous store
    device: str
    dtype: str  # a torch dtype name: "bfloat16"
    parent_pid: int


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Rank r's device: cuda:(i + r) for rank 0 on cuda:i; every rank on the CPU with gloo."""
    if device.type != "cuda":
        return [device] * size
    first = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if first + size > count:
        raise ConfigError(
            f"tensor_parallel_size {size} needs {size} CUDA devices from cuda:{first} on; this host has {count}",
            param="tensor_parallel_size",
        )
    return [torch.device("cuda", first + r) for r in range(size)]


class WorkerGroup:
    """Ranks 1..N-1, seen from rank 0. ``tp`` is rank 0's context (for its model and collectives)."""

    def __init__(self, procs: list[Any], commands: list[Connection], reports: list[Connection]) -> None:
        self.procs = procs
        self._commands = commands
        self._reports = reports
        self.tp = TensorParallel()
        self._failure: str | None = None
        self._closing = threading.Event()
        self._failed = threading.Event()
        self._store: Any = None
        self._aborter: threading.Thread | None = None
        self._released = False
        self._abort_lock = threading.Lock()
        # Runs on close(), when the group is collected, or at interpreter exit: whichever comes first.
        self._finalizer = weakref.finalize(self, _stop_workers, procs, commands, reports, self._closing)

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> WorkerGroup:
        """Spawn ranks 1..N-1 for ``config`` (rank 0 on ``device``) and join the group with them. A model that
        cannot be cut ``config.tensor_parallel_size`` ways is refused before anything starts."""
        from openautoglm.engine.loader import read_arch_config, resolve_checkpoint
        from openautoglm.engine.parallel.worker import worker_main

        size = config.tensor_parallel_size
        check_tensor_parallel(read_arch_config(resolve_checkpoint(config.model)), size)
        devices = rank_devices(device, size)
        set_collective_env()  # inherited by the workers, read by NCCL in every rank
        store = master_store(size)
        ctx = mp.get_context("spawn")
        procs, commands, reports = [], [], []
        group = cls(procs, commands, reports)
        try:
            for rank in range(1, size):
                cmd_out, cmd_in = ctx.Pipe(duplex=False)
                rep_out, rep_in = ctx.Pipe(duplex=False)
                spec = WorkerSpec(config, rank, size, store.port, str(devices[rank]), dtype_name(dtype), os.getpid())
                proc = ctx.Process(
                    target=worker_main, args=(spec, cmd_out, rep_in), name=f"autoglm-tp-rank{rank}", daemon=True
                )
                proc.start()
                cmd_out.close()
                rep_in.close()
                procs.append(proc)
                commands.append(cmd_in)
                reports.append(rep_out)
            group._expect("started", START_TIMEOUT_S)
            group.tp = connect(
                0, size, store.port, devices[0], store, custom_all_reduce=not config.disable_custom_all_reduce
            )
        except BaseException:
            group.close()
            raise
        group._store = store  # the workers' rendezvous keeps its server alive as long as the group
        return group

    # ---- start-up ----------------------------------------------------------------------------------------

    def _expect(self, kind: str, timeout: float | None) -> list[Any]:
        """Wait for every worker's ``kind`` report (its payload); a failure report is raised as it was raised
        in the worker, an exit or a timeout as TensorParallelError."""
        payloads = []
        for i, (proc, conn) in enumerate(zip(self.procs, self._reports, strict=True)):
            if not wait([conn, proc.sentinel], timeout):
                raise TensorParallelError(f"tensor-parallel rank {i + 1} did not report {kind!r} within {timeout} s")
            if not conn.poll():
                raise TensorParallelError(self._exit_reason(i, f"while waiting for {kind!r}"))
            try:
                got, payload = conn.recv()
            except (EOFError, OSError):
                raise TensorParallelError(self._exit_reason(i, f"while waiting for {kind!r}")) from None
            if got == "failed":
                raise payload
            payloads.append(payload)
        return payloads

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV block count every rank can hold: rank 0's ``num_blocks`` or less, once the workers have loaded
        their shards and measured their memory. From here on, the watcher thread looks after the workers."""
        capacities = [c for c in self._expect("loaded", None) if c is not None]
        agreed = min([num_blocks, *capacities])
        if agreed < 2:
            raise ConfigError(
                f"a tensor-parallel rank has room for {agreed} KV blocks; raise cache.gpu_memory_utilization or "
                "lower cache.block_size",
                param="gpu_memory_utilization",
            )
        # The watcher holds the group weakly: an engine dropped without close() is still collected (and its
        # workers stopped by the finalizer).
        watch_args = (self.procs, self._reports, self._closing, weakref.ref(self))
        threading.Thread(target=_watch, args=watch_args, name="autoglm-tp-watch", daemon=True).start()
        return agreed

    # ---- steps -------------------------------------------------------------------------------------------

    def send(self, message: tuple[Any, ...]) -> None:
        """A command for every worker (a step, a capture, stop)."""
        self.check()
        data = pickle.dumps(message, _PICKLE)
        for conn in self._commands:
            try:
                conn.send_bytes(data)
            except OSError as exc:
                raise self._lost(exc) from exc

    def guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run rank 0's side of a step; a failure caused by a lost worker becomes that worker's error."""
        self.check()
        try:
            return fn(*args)
        except TensorParallelError:
            raise
        except Exception as exc:
            if not self._failed.wait(2.0):
                raise
            raise self._lost(exc) from exc

    def check(self) -> None:
        if self._failure is not None:
            raise TensorParallelError(f"{self._failure}; the engine cannot go on and must be restarted")

    def _lost(self, exc: BaseException) -> TensorParallelError:
        self._failed.wait(5.0)  # give the watcher the time to read why
        reason = self._failure or f"a tensor-parallel rank stopped answering ({type(exc).__name__}: {exc})"
        return TensorParallelError(f"{reason}; the engine cannot go on and must be restarted")

    def _worker_lost(self, i: int) -> None:
        self._failure = self._exit_reason(i, "while serving")
        logger.error("Open-AutoGLM: %s; stopping the engine", self._failure)
        self._failed.set()
        # Collectives waiting for the lost rank return (with garbage) instead of hanging; the rest of NCCL's
        # teardown waits for the CUDA graphs, which close() destroys.
        self._abort(wait_s=0.0)

    def _abort(self, wait_s: float) -> bool:
        """Abort rank 0's side of the group (once, on a thread of its own); True when it has finished."""
        with self._abort_lock:
            if self._aborter is None:
                self._aborter = threading.Thread(target=self.tp.abort, name="autoglm-tp-abort", daemon=True)
                self._aborter.start()
            aborter = self._aborter
        aborter.join(wait_s)
        return not aborter.is_alive()

    def _exit_reason(self, i: int, when: str) -> str:
        proc = self.procs[i]
        failure = _reported_failure(self._reports[i])
        if failure is not None:
            return f"tensor-parallel rank {i + 1} (pid {proc.pid}) failed {when}: {failure}"
        deadline = time.monotonic() + 2.0
        while proc.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.02)  # not join(): another thread may be reaping it, and then join() sees nothing
        code = proc.exitcode
        how = "is stuck" if code is None else f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        return f"tensor-parallel rank {i + 1} (pid {proc.pid}) {how} {when}"

    # ---- shutdown ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers and leave the group (idempotent). Rank 0's CUDA graphs must be gone first: NCCL
        does not let a communicator go while a graph holds its kernels."""
        self._finalizer()
        if not self._abort(wait_s=ABORT_TIMEOUT_S):
            logger.warning("Open-AutoGLM: the tensor-parallel group did not shut down within %.0f s", ABORT_TIMEOUT_S)
            return
        if not self._released:
            self._released = True
            try:
                self.tp.release()
            except Exception:  # the memory leaks until the process exits; nothing else depends on it
                logger.exception("Open-AutoGLM: could not free the tensor-parallel all-reduce buffers")


def _watch(
    procs: list[Any], reports: list[Connection], closing: threading.Event, group: weakref.ref[WorkerGroup]
) -> None:
    """Wait for the first worker to exit or report; unless the group is closing, that worker is lost."""
    sentinels = {proc.sentinel: i for i, proc in enumerate(procs)}
    conns = {conn: i for i, conn in enumerate(reports)}
    ready = wait([*sentinels, *conns])
    alive = group()
    if alive is None or closing.is_set():
        return
    first = ready[0]
    alive._worker_lost(sentinels[first] if isinstance(first, int) else conns[first])


def _stop_workers(
    procs: list[Any], commands: list[Connection], reports: list[Connection], closing: threading.Event
) -> None:
    """Tell every worker to stop, wait for them, and end those that do not stop in time."""
    closing.set()
    stop = pickle.dumps(("stop",), _PICKLE)
    for conn in commands:
        with contextlib.suppress(OSError):  # that worker is already gone
            conn.send_bytes(stop)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("Open-AutoGLM: tensor-parallel worker %s did not stop; killing it", proc.name)
            proc.kill()
            proc.join(5.0)
    for conn in (*commands, *reports):
        conn.close()


def _reported_failure(conn: Connection) -> Any | None:
    """What a worker reported as its failure, if it reported one within a second; None when it reported nothing
    or died before it could (its exit code then says how)."""
    try:
        if conn.poll(1.0):
            kind, payload = conn.recv()
            return payload if kind == "failed" else None
    except (EOFError, OSError):
        return None
    return None
