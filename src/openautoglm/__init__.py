"""Open-AutoGLM: serve GLM-family language models in production."""

__version__ = "0.1.0"
