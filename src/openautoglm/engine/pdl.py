"""Programmatic dependent launch (Hopper and newer) for Open-AutoGLM's decode-path Triton kernels.

A decode step at batch 1 is a chain of ~450 kernels (11 per layer), most of them a few microseconds long; between
two of them the GPU drains one grid before it launches the next. Launched with programmatic dependent launch, a
kernel's programs are scheduled while the previous kernel's last programs still run, and wait
(``griddepcontrol.wait``) until that kernel has finished and its writes are visible before they read anything it
wrote. CUDA graphs keep the launch attribute as a programmatic edge, so replayed steps overlap the same way.

Every kernel launched with ``launch()``'s arguments calls ``begin`` in every program before it reads anything an
earlier kernel wrote and before it returns: a kernel that never waited could finish before its predecessor and
break the chain of waits (the kernel after it waits for this one only). Before ``begin`` a kernel may read only
what no kernel writes (weights): kernels further back than the previous one may still be running then, since
each lets the next launch as it starts. Kernels launched without these arguments are ordered as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

_enabled: bool | None = None  # None: decided from the GPU on first use
_active = False  # inside ``active``: the launches of this process's current forward pass
_ON = {"PDL": True, "launch_pdl": True}
_OFF = {"PDL": False}


def configure(enabled: bool | None) -> None:
    """On, off, or None for the default: on where the GPU supports it (compute capability 9.0 and newer)."""
    global _enabled
    _enabled = enabled if enabled is None else bool(enabled and supported())


def supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = supported()
    return _enabled


@contextlib.contextmanager
def active(on: bool = True) -> Iterator[None]:
    """Launch the kernels of the block with programmatic dependent launch (where enabled). The runner opens it
    for CUDA-graph captures only: an eager launch with the attribute costs the host more (see the runner)."""
    global _active
    before, _active = _active, on and enabled()
    try:
        yield
    finally:
        _active = before


def launch() -> dict[str, bool]:
    """The keyword arguments of a launch: the kernel's ``PDL`` constant and Triton's launch attribute."""
    return _ON if _active else _OFF


@triton.jit
def begin(PDL: tl.constexpr):
    """Let the next kernel's programs be scheduled, then wait for the previous kernel's writes."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
