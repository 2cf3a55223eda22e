"""Attention backends behind one interface; the scheduler and models never know which one runs."""

from openautoglm.engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

__all__ = ["AttentionBackend", "AttentionMetadata", "ForwardContext"]
