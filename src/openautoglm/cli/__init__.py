"""cli layer of Open-AutoGLM (see DESIGN.md)."""
