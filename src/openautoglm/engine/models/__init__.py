"""GLM-family model implementations. Every model has the same constructor and forward signature (base.py)."""
