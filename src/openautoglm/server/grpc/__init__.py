"""The KServe v2 / Open Inference Protocol gRPC service (``inference.GRPCInferenceService``)."""

from openautoglm.server.grpc.servicer import SERVICE_NAME, InferenceServicer, start_grpc_server

__all__ = ["SERVICE_NAME", "InferenceServicer", "start_grpc_server"]
