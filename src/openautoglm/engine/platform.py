"""What the device can run: the compute-capability gate for the GPU fast path, and for fp8.

Open-AutoGLM's fast path (Triton paged attention, CUDA graphs, GPU sampling, int8 kernels) needs a CUDA GPU of
compute capability 7.5 or newer (Turing and later: Triton's tensor-core kernels and bf16/fp16 MMA). Older GPUs
and the CPU run the reference path. fp8 matmuls (``torch._scaled_mm`` with row-wise scales) need Hopper (9.0).

The decisions are pure functions of the GPU's name and capability (``fast_path_decision``), so start-up,
``autoglm doctor`` and the tests all read the same rule; ``fast_path_support`` reads them off a device.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch

from openautoglm.protocol.errors import ConfigError

FAST_PATH_MIN_CAPABILITY = (7, 5)
FP8_MIN_CAPABILITY = (9, 0)


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as Open-AutoGLM's settings and child processes spell it ("bfloat16", not "torch.bfloat16")."""
    return str(dtype).removeprefix("torch.")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fast_path_decision(gpu_name: str, capability: tuple[int, int], has_triton: bool) -> tuple[bool, str]:
    """Whether a GPU called ``gpu_name`` with ``capability`` may run the fast path, and why (one line)."""
    where = f"GPU {gpu_name!r} (compute capability {_cc(capability)})"
    if tuple(capability) < FAST_PATH_MIN_CAPABILITY:
        return False, (
            f"{where}: Open-AutoGLM's GPU fast path needs compute capability "
            f"{_cc(FAST_PATH_MIN_CAPABILITY)} or newer (Turing, Ampere, Ada, Hopper, Blackwell); "
            "falling back to the reference attention path, which is correct but much slower"
        )
    if not has_triton:
        return False, (
            f"{where}: the Python package 'triton' is not installed (it ships with CUDA builds of PyTorch); "
            "falling back to the reference attention path"
        )
    return True, f"{where}: GPU fast path available"


def device_identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    """The CUDA device's name and compute capability."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def fast_path_support(device: torch.device | str) -> tuple[bool, str]:
    """``(allowed, message)``: may ``device`` run the GPU fast path? The message says why, for logs and doctor."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device {str(device)!r} is not a CUDA GPU: the reference (PyTorch) path runs"
    if not torch.cuda.is_available():
        return False, "this PyTorch build sees no CUDA device: the reference (PyTorch) path runs"
    name, capability = device_identity(device)
    return fast_path_decision(name, capability, triton_available())


def fp8_decision(device: str, gpu_name: str | None, capability: tuple[int, int] | None) -> str | None:
    """None when fp8 W8A8 can run, else the reason (``gpu_name`` None: ``device`` is not a CUDA GPU)."""
    if gpu_name is None or capability is None:
        return (
            "quantization 'fp8' needs an NVIDIA GPU of compute capability "
            f"{_cc(FP8_MIN_CAPABILITY)} or newer (Hopper: H100, H200, or later); the model's device is "
            f"{device!r}. Use quantization 'int8' or 'none' there"
        )
    if tuple(capability) < FP8_MIN_CAPABILITY:
        return (
            f"quantization 'fp8' needs compute capability {_cc(FP8_MIN_CAPABILITY)} or newer (Hopper: H100, "
            f"H200, or later); GPU {gpu_name!r} has compute capability {_cc(capability)}. "
            "Use quantization 'int8' or 'none' on it"
        )
    return None


def check_fp8_support(device: torch.device) -> None:
    """Raise ConfigError naming the device and its compute capability unless it can run fp8 W8A8."""
    if device.type == "cuda" and torch.cuda.is_available():
        reason = fp8_decision(str(device), *device_identity(device))
    else:
        reason = fp8_decision(str(device), None, None)
    if reason is not None:
        raise ConfigError(reason)


def configure_launches(enabled: bool | None, device: torch.device) -> None:
    """Programmatic dependent launch for the Triton kernels of this process (``engine.programmatic_launch``;
    None: on for GPUs of compute capability 9.0 and newer)."""
    if device.type == "cuda" and triton_available():
        from openautoglm.engine import pdl

        pdl.configure(enabled)


def launch_scope(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A block whose Triton kernels use programmatic dependent launch (where enabled); a no-op block off CUDA or
    without Triton."""
    if device.type != "cuda" or not triton_available():
        return contextlib.nullcontext()
    from openautoglm.engine import pdl

    return pdl.active()
