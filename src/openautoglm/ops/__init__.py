"""ops layer of Open-AutoGLM (see DESIGN.md)."""
