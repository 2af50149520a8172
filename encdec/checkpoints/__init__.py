"""Checkpoint formats: Hugging Face directories -> :class:`encdec.Model`."""

from encdec.checkpoints.hf import CheckpointError, load_params, tensor_specs
from encdec.checkpoints.pretrained import Model, load_pretrained, quantize_model

__all__ = ["CheckpointError", "Model", "load_params", "load_pretrained", "quantize_model", "tensor_specs"]
