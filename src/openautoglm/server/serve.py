"""``autoglm serve``: load the engine, serve HTTP (uvicorn) and gRPC, drain on SIGINT/SIGTERM.

Drain: readiness turns 503 at once and new requests get 503 with Retry-After (the listeners stay open so
clients get an answer, not a refused connection); in-flight requests have ``server.drain_timeout`` seconds to
finish, then are aborted (their responses end with ``finish_reason: "abort"``); the process exits 0. A second
Ctrl-C (SIGINT) while draining aborts everything at once and exits 1; a repeated SIGTERM changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

import openautoglm
from openautoglm.config.settings import DEMO_MODEL, Settings
from openautoglm.engine.async_engine import EngineFrontend
from openautoglm.engine.engine_process import EngineProcess
from openautoglm.protocol.errors import ConfigError, InvalidRequestError
from openautoglm.router.rollout import RolloutEvent
from openautoglm.router.router import Router
from openautoglm.server.grpc import start_grpc_server
from openautoglm.server.http.app import create_app
from openautoglm.server.http.router_admin import reload_from_file
from openautoglm.server.http.state import ServerState
from openautoglm.server.tls import grpc_credentials, uvicorn_ssl_options, with_client_certificates

logger = logging.getLogger("openautoglm.server")
_RELOADS: set[asyncio.Task[None]] = set()
_ABORT_GRACE_S = 5.0  # after aborting, how long aborted requests get to send their last chunk


def run_server(settings: Settings, config_file: Path | None = None) -> int:
    """Serve until a signal drains the server; the exit code (0 after a clean drain). ``config_file`` is what
    SIGHUP re-reads to reload the router."""
    configure_logging()
    console = Console(stderr=True, soft_wrap=True)  # a log file has no width: never wrap lines
    check_auth_settings(settings, console)
    model = settings.engine.model.model
    started = time.perf_counter()
    with console.status(f"Open-AutoGLM: loading model [bold]{model}[/bold] …"):
        engine = start_engine(settings)
    console.print(f"Model [bold]{engine.model_name}[/bold] loaded in {time.perf_counter() - started:.1f} s")
    app = create_app(settings, engine)
    app.state.config_file = config_file  # what POST /admin/reload and SIGHUP re-read
    if settings.router.enabled:
        app.state.router = build_router(settings, engine, app.state.gateway)
    freeze_startup_heap()
    return _run_loop(_serve(settings, engine, app, console))


def start_engine(settings: Settings) -> EngineProcess:
    """The engine in a process of its own, so that the step loop and the event loop never wait for each other's
    GIL (see engine/engine_process.py). Its torch threads leave one core to this process: on a busy core,
    OpenMP's parallel regions wait for their slowest thread. An explicit OMP_NUM_THREADS wins."""
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, len(os.sched_getaffinity(0)) - 1)
    return EngineProcess.start(settings.engine, num_threads=threads)


def freeze_startup_heap() -> None:
    """What start-up built (modules, the app, the tokenizer) lives as long as the process: move it out of the
    cyclic GC's reach, or every full collection under load scans it all (hundreds of ms each time)."""
    gc.collect()
    gc.freeze()


def build_router(settings: Settings, engine: EngineFrontend, gateway: Any) -> Router:
    """The router over ``settings.router``'s deployments; API keys of remote backends come from this process's
    environment (read here, at the top, never deeper); rollout steps go to the gateway's audit log."""

    async def audit(event: RolloutEvent) -> None:
        await gateway.auditor.record(
            event.actor, f"rollout.{event.action}", event.deployment, "ok",
            detail={"version": event.version, "weight_from": event.weight_from, "weight_to": event.weight_to,
                    "reason": event.reason, "canary": event.canary, "stable": event.stable},
        )  # fmt: skip

    return Router(
        settings.router, engine=engine, environ=dict(os.environ), audit=audit, engine_template=settings.engine
    )


def on_sighup(app_state: Any) -> None:
    """SIGHUP: reload as ``POST /admin/reload`` does (validated first, audited); an invalid file changes nothing."""

    async def reload() -> None:
        with contextlib.suppress(InvalidRequestError):  # refused: reload_from_file has logged and audited why
            await reload_from_file(app_state, "signal:SIGHUP")

    task = asyncio.get_running_loop().create_task(reload(), name="autoglm-reload")
    _RELOADS.add(task)  # the loop keeps only a weak reference to tasks
    task.add_done_callback(_RELOADS.discard)


def check_auth_settings(settings: Settings, console: Console) -> None:
    """Authentication may be off only on loopback, and never quietly."""
    if settings.gateway.auth.required:
        return
    if not is_loopback(settings.server.host):
        raise ConfigError(
            f"--no-auth (gateway.auth.required=false) is allowed only on a loopback address, not on "
            f"{settings.server.host}: anyone who can reach the port could use the model and the admin API"
        )
    console.print(
        "[bold yellow]Warning:[/bold yellow] authentication is OFF (--no-auth): every local process can use "
        "this server and its admin API."
    )


def configure_logging() -> None:
    """Access logs: one JSON object per line on stdout. Everything else: plain lines on stderr."""
    access = logging.getLogger("openautoglm.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("openautoglm").setLevel(logging.INFO)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    if importlib.util.find_spec("uvloop") is None:
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: signals start our drain instead of closing the listeners."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(settings: Settings, engine: EngineFrontend, app: Any, console: Console) -> int:
    cfg = settings.server
    state: ServerState = app.state.server_state
    server = _Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            http=with_client_certificates(_http_protocol()),
            lifespan="off",
            log_config=None,
            access_log=False,  # ours is structured (middleware.py)
            server_header=False,
            timeout_graceful_shutdown=_ABORT_GRACE_S,
            **uvicorn_ssl_options(settings.gateway.tls),
        )
    )
    grpc_server = None
    if cfg.grpc_port:
        grpc_server = await start_grpc_server(
            engine,
            cfg.host,
            cfg.grpc_port,
            is_ready=lambda: engine.is_healthy() and not state.draining,
            gateway=app.state.gateway,
            credentials=grpc_credentials(settings.gateway.tls),
        )
    serving = asyncio.create_task(_uvicorn(server))
    drain = _Drain(settings, engine, state, server, grpc_server)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, drain.on_signal, sig)
    router = getattr(app.state, "router", None)
    if router is not None:
        await router.start()
        loop.add_signal_handler(signal.SIGHUP, on_sighup, app.state)
    await app.state.observability.start()  # detectors, event-loop lag
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            _banner(console, settings, engine, _bound_port(server, cfg.port))
        await serving
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if router is not None:
            await router.aclose()
        if grpc_server is not None:
            await grpc_server.stop(0)
        await app.state.observability.aclose()
        await app.state.gateway.close()
        await engine.shutdown()
    if not server.started:
        console.print(f"[red]Open-AutoGLM could not listen on {cfg.host}:{cfg.port}[/red] (see the log above)")
        return 1
    return drain.exit_code


async def _uvicorn(server: _Server) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why, _serve reports it
        return


class _Drain:
    def __init__(
        self, settings: Settings, engine: EngineFrontend, state: ServerState, server: _Server, grpc_server: Any
    ) -> None:
        self.cfg = settings.server
        self.engine = engine
        self.state = state
        self.server = server
        self.grpc_server = grpc_server
        self.task: asyncio.Task[None] | None = None
        self.exit_code = 0

    def on_signal(self, sig: int) -> None:
        if self.task is None:
            logger.info(
                "%s: draining; in-flight requests have %.0f s to finish",
                signal.Signals(sig).name,
                self.cfg.drain_timeout,
            )
            self.task = asyncio.create_task(self.run())
            return
        if sig != signal.SIGINT:  # orchestrators may repeat SIGTERM; only a second Ctrl-C means "now"
            logger.info("%s again: still draining", signal.Signals(sig).name)
            return
        logger.warning("%s again: aborting every request and exiting now", signal.Signals(sig).name)
        self.exit_code = 1
        self.task.cancel()
        asyncio.get_running_loop().create_task(self._abort_all())
        self.server.should_exit = True
        self.server.force_exit = True

    async def run(self) -> None:
        self.state.begin_drain()
        grpc_stopped = None
        if self.grpc_server is not None:
            # New RPCs are refused at once; running ones get the same time as HTTP ones.
            grpc_stopped = asyncio.create_task(self.grpc_server.stop(self.cfg.drain_timeout))
        finished = await self._wait_idle(self.cfg.drain_timeout)
        if not finished:
            count = await self._abort_all()
            logger.warning("drain timeout: aborted %d in-flight engine requests", count)
            await self._wait_idle(_ABORT_GRACE_S)
        if grpc_stopped is not None:
            await grpc_stopped
        logger.info("drained; shutting down")
        self.server.should_exit = True

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.state.active_requests > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _abort_all(self) -> int:
        ids = list(self.state.engine_requests)
        for rid in ids:
            await self.engine.abort(rid)
        return len(ids)


def _http_protocol() -> type:
    if importlib.util.find_spec("httptools"):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bound_port(server: uvicorn.Server, configured: int) -> int:
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            return int(sock.getsockname()[1])
    return configured


def _banner(console: Console, settings: Settings, engine: EngineFrontend, port: int) -> None:
    cfg = settings.server
    base = f"{'https' if settings.gateway.tls.enabled else 'http'}://{cfg.host}:{port}"
    modalities = ", ".join(sorted(engine.modalities))
    console.print(
        f"\n[bold]Open-AutoGLM {openautoglm.__version__}[/bold] serving [bold]{engine.model_name}[/bold] "
        f"(context {engine.max_model_len} tokens; input: {modalities})"
    )
    console.print(f"  OpenAI API     {base}/v1   (chat/completions, completions, models)")
    console.print(f"  Native API     {base}/v1/infer   tokenizer: {base}/tokenize, {base}/detokenize")
    grpc = f"{cfg.host}:{cfg.grpc_port}" if cfg.grpc_port else "off (--grpc-port to enable)"
    console.print(f"  KServe v2 gRPC {grpc}")
    console.print(f"  Health         {base}/healthz  {base}/ready    Metrics {base}/metrics    Docs {base}/docs")
    console.print(f"  Ctrl-C or SIGTERM drains: in-flight requests get {cfg.drain_timeout:g} s to finish.")
    if settings.engine.model.model == DEMO_MODEL:
        console.print(
            "[yellow]Note:[/yellow] 'demo' is a tiny randomly initialised model for trying Open-AutoGLM out: "
            "its output is random text.\n  Serve a real GLM checkpoint with "
            "[bold]autoglm serve --model PATH[/bold] (a local checkpoint directory) or "
            "[bold]--model THUDM/glm-4-9b-chat-hf[/bold] (a hub id in the local cache)."
        )
    console.print()
