"""Maps a checkpoint's ``architectures[0]`` to the Open-AutoGLM implementation that serves it."""

from __future__ import annotations

from torch import nn

from openautoglm.engine.models.glm import GlmForCausalLM
from openautoglm.engine.models.glm4 import Glm4ForCausalLM
from openautoglm.protocol.errors import ModelLoadError

_MODELS: dict[str, type[nn.Module]] = {
    "GlmForCausalLM": GlmForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for ``architecture``; an unknown one is a ModelLoadError naming the supported ones."""
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ModelLoadError(
            f"model architecture {architecture!r} is not supported by Open-AutoGLM; "
            f"supported: {', '.join(supported_architectures())}"
        ) from None
