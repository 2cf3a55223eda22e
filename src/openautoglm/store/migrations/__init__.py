"""Alembic migrations of Open-AutoGLM's store, shipped in the package and run programmatically (store/db.py)."""
