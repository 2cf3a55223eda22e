"""Open-AutoGLM's own inference engine: paged KV cache, continuous batching, prefix caching, batched sampling."""
