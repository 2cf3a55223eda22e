"""gateway layer of Open-AutoGLM (see DESIGN.md)."""
