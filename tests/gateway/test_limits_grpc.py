"""Rate limits on gRPC: the same policy refuses a key over its RPM with RESOURCE_EXHAUSTED and a retry hint."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.gateway.keys import Actor
from openautoglm.gateway.service import Gateway
from openautoglm.server.grpc import start_grpc_server
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2 as pb
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc

from .conftest import gateway_settings  # type: ignore[import-not-found]
from .traffic_fakes import free_port  # type: ignore[import-not-found]


async def test_grpc_over_the_limit_is_resource_exhausted(engine: AsyncEngine, tmp_path: Path) -> None:
    gw = Gateway(gateway_settings(tmp_path, limits={"burst_fraction": 0.5}))
    key = gw.keys.create(Actor("t"), name="t", owner="o", scopes=["models:read"], rpm=2)[1]
    port = free_port()
    server = await start_grpc_server(engine, "127.0.0.1", port, gateway=gw)
    metadata = (("authorization", f"Bearer {key}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata)  # capacity 1 of 2 per minute
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "RPM" in (err.value.details() or "")
    finally:
        await server.stop(0)
        await gw.close()
