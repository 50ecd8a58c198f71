"""The Llama model: hyper-parameters, the transformer, its key/value cache, and its preparation for a device.

Leaves out: reading checkpoints (nabla.checkpoint) and generating (nabla.generation).
"""

from nabla.model.args import SHAPES, ModelArgs, from_name, param_count
from nabla.model.llama import Transformer
from nabla.model.prepare import prepare_model

__all__ = ["ModelArgs", "SHAPES", "Transformer", "from_name", "param_count", "prepare_model"]
