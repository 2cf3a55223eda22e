"""router layer of Open-AutoGLM (see DESIGN.md)."""
