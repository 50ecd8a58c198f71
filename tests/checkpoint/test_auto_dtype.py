"""dtype="auto": the checkpoint's dtype where the device computes in it, asked for by name otherwise."""

import pytest
import torch

from nabla.device import auto_dtype, resolve_dtype
from nabla.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize("stored,want", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                         (torch.float16, torch.float32), (None, torch.float32)])
def test_auto_on_cpu(stored, want):
    assert auto_dtype(CPU, stored) == want
    assert resolve_dtype("auto", CPU, stored) == want


def test_named_and_default():
    assert resolve_dtype("fp32", CPU, torch.bfloat16) == torch.float32
    assert resolve_dtype("bf16", CPU, torch.float32) == torch.bfloat16
    assert resolve_dtype(None, CPU, torch.bfloat16) == torch.float32  # the device's default, as before
    with pytest.raises(ConfigError, match="auto"):
        resolve_dtype("fp8", CPU, None)
