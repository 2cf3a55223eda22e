"""The gateway's own cost: ``python -m openautoglm.ops.bench_gateway`` starts a fast fake OpenAI backend and an
``autoglm serve`` routing a model to it with auth, rate limits, admission and the response cache on, then drives
both with wrk (closed loop, small non-streaming chat requests): latency at concurrency 1 (gateway minus the
backend alone = added latency), the sustained rate, p99 near half of it, and the server's CPU per request."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

_FAKE = r"""
import orjson, sys
from aiohttp import web
BODY = orjson.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
SSE = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in (
    CHUNK | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi there"}, "finish_reason": None}]},
    CHUNK | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    CHUNK | {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
)) + b"data: [DONE]\n\n"
async def chat(request):
    body = orjson.loads(await request.read())
    if body.get("stream"):
        return web.Response(body=SSE, content_type="text/event-stream")
    return web.Response(body=BODY, content_type="application/json")
async def models(request):
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})
app = web.Application()
app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
_LUA = """wrk.method = "POST"
wrk.body = '{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": %s}'
wrk.headers["Content-Type"] = "application/json"
%s
"""


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, lua: Path, connections: int, seconds: int, threads: int = 1) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]), "rps": rate, "requests": total,
            "errors": int(non2xx.group(1)) if non2xx else 0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16, help="Closed-loop connections for the sustained rate")
    ap.add_argument("--redis", default=None, help="Redis URL: limits and the L2 cache in Redis (as replicas run)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    fake_port, port = _port(), _port()
    (work / "fake.py").write_text(_FAKE)
    fake = subprocess.Popen([sys.executable, str(work / "fake.py"), str(fake_port)])
    config = work / "config.yaml"
    config.write_text(json.dumps({
        "router": {"enabled": True, "deployments": [
            {"model": "fake", "backends": [{"name": "f", "url": f"http://127.0.0.1:{fake_port}/v1"}]}]},
        "gateway": {"limits": {"global_rps": 100000, "key_defaults": {"rpm": 10_000_000}},
                    "cache": {"enabled": True}, "auth": {"secret": "bench-secret-" + "0" * 40}},
        "store": {"data_dir": str(work / "data"), "redis_url": args.redis, "redis_prefix": f"bench-{os.getpid()}:"},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    create = [sys.executable, "-m", "openautoglm.cli.main", "keys", "create", "--config", str(config), "--name",
              "bench", "--owner", "bench", "--scope", "inference"]  # fmt: skip
    serve = [sys.executable, "-m", "openautoglm.cli.main", "serve", "--config", str(config), "--host", "127.0.0.1",
             "--port", str(port), "--grpc-port", "0"]  # fmt: skip
    with (work / "serve.log").open("w") as log:
        server = subprocess.Popen(serve, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait(f"http://127.0.0.1:{fake_port}/v1/models")
        _wait(f"http://127.0.0.1:{port}/ready")
        key_out = subprocess.run(create, env=env, capture_output=True, text=True, check=True).stdout
        key = re.search(r"sk-agl-\S+", key_out).group(0)  # type: ignore[union-attr]
        auth = f'wrk.headers["Authorization"] = "Bearer {key}"'
        lua = {name: work / f"{name}.lua" for name in ("direct", "miss", "hit")}
        lua["direct"].write_text(_LUA % ("0.7", ""))
        lua["miss"].write_text(_LUA % ("0.7", auth))  # not deterministic: auth, limits, queue, router, backend
        lua["hit"].write_text(_LUA % ("0", auth))  # deterministic: answered from the L1 cache
        gw = f"http://127.0.0.1:{port}/v1/chat/completions"
        direct = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        check = httpx.post(gw, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        if check.status_code != 200:
            raise SystemExit(f"the gateway answered {check.status_code}: {check.text}")
        wrk(gw, lua["miss"], 4, 3)  # warm up
        wrk(gw, lua["hit"], 4, 2)
        results: dict[str, dict[str, float]] = {}
        results["direct_c1"] = wrk(direct, lua["direct"], 1, args.seconds)
        results["gateway_c1"] = wrk(gw, lua["miss"], 1, args.seconds)
        results["cache_hit_c1"] = wrk(gw, lua["hit"], 1, args.seconds)
        for name, script in (("gateway", lua["miss"]), ("cache_hit", lua["hit"])):
            cpu0 = _cpu_s(server.pid)
            r = wrk(gw, script, args.connections, args.seconds)
            r["cpu_ms_per_request"] = (_cpu_s(server.pid) - cpu0) * 1e3 / max(1, r["requests"])
            results[f"{name}_sustained"] = r
        half = results["gateway_sustained"]["rps"] / 2
        c = 1
        while c < args.connections:  # the closed-loop concurrency whose rate is nearest half the sustained one
            r = wrk(gw, lua["miss"], c + 1, 3)
            if r["rps"] > half:
                break
            c += 1
        results["gateway_half_rate"] = wrk(gw, lua["miss"], c, args.seconds) | {"connections": c}
        results["added_p50_ms"] = {"value": results["gateway_c1"]["p50_ms"] - results["direct_c1"]["p50_ms"]}
        print(json.dumps(results, indent=2))
    finally:
        server.terminate()
        fake.terminate()
        server.wait(60)
        fake.wait(10)
        if args.redis:
            import redis

            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"bench-{os.getpid()}:*"))
            if keys:
                client.delete(*keys)


if __name__ == "__main__":
    main()
