"""The Llama model: hyper-parameters, the transformer, its key/value cache."""

from nabla.model.args import SHAPES, ModelArgs, args_from_params, from_name, param_count
from nabla.model.llama import Transformer

__all__ = ["ModelArgs", "SHAPES", "Transformer", "args_from_params", "from_name", "param_count"]
