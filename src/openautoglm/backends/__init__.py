"""The model adapter layer: one Backend interface over the local engine, OpenAI-compatible endpoints and other
Open-AutoGLM servers (see DESIGN.md)."""

from openautoglm.backends.base import Backend, Capabilities, Health, Load, UpstreamError, UpstreamTimeoutError

__all__ = ["Backend", "Capabilities", "Health", "Load", "UpstreamError", "UpstreamTimeoutError"]
