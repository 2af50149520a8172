"""encdec: serve and fine-tune encoder-decoder transformers in JAX.

The public API: load a Hugging Face checkpoint with :func:`load_pretrained`, generate with the
reference generator :func:`reference_generate`.
"""

from encdec.checkpoints import CheckpointError, Model, load_pretrained, quantize_model
from encdec.config import ModelConfig, UnsupportedModelError
from encdec.generate import GenerationOutput, reference_generate
from encdec.models.quant import QuantizationError

__all__ = [
    "CheckpointError",
    "GenerationOutput",
    "Model",
    "ModelConfig",
    "QuantizationError",
    "UnsupportedModelError",
    "load_pretrained",
    "quantize_model",
    "reference_generate",
]
