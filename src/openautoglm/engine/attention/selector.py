"""Which attention backend runs: the Triton kernels where they can, the reference backend everywhere else."""

from __future__ import annotations

import logging

import torch

from openautoglm.config.settings import EngineConfig
from openautoglm.engine.attention.base import AttentionBackend
from openautoglm.engine.attention.reference import ReferenceAttentionBackend
from openautoglm.engine.platform import device_identity, fast_path_support
from openautoglm.protocol.errors import ConfigError

logger = logging.getLogger(__name__)

BF16_CAPABILITY = (8, 0)  # Triton's bfloat16 matrix products need Ampere or newer


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton backend cannot run on ``device`` in ``dtype``; None when it can. The GPU rule (compute
    capability, Triton installed) is the platform module's, shared with start-up checks and ``autoglm doctor``."""
    if device.type != "cuda":
        return f"the device is {device.type}, and the Triton kernels need a CUDA GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the model dtype is {str(dtype).removeprefix('torch.')}; the Triton kernels take bfloat16 or float16"
    allowed, message = fast_path_support(device)
    if not allowed:
        return message
    name, cap = device_identity(device)
    if dtype == torch.bfloat16 and cap < BF16_CAPABILITY:
        return f"{name} (compute capability {cap[0]}.{cap[1]}) has no bfloat16 matrix units; use dtype float16"
    return None


def select_backend(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The backend ``config.attention_backend`` asks for: "reference", "triton" (an error where it cannot run),
    or "auto" (Triton where it can run, else the reference backend, logging why)."""
    choice = config.attention_backend
    if choice == "reference":
        return ReferenceAttentionBackend()
    reason = triton_unavailable_reason(device, dtype)
    if reason is None:
        from openautoglm.engine.attention.triton_paged import TritonPagedAttentionBackend

        return TritonPagedAttentionBackend(device)
    if choice == "triton":
        raise ConfigError(f"attention_backend 'triton' cannot run here: {reason}", param="attention_backend")
    if device.type == "cuda":  # on the CPU the reference backend is the only one: nothing to report
        logger.warning("Open-AutoGLM: using the reference attention backend (slow): %s", reason)
    return ReferenceAttentionBackend()
