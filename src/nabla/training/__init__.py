"""Training: corpus and tokens (data), learning-rate schedule (schedule), settings (config), the run
folder and its saved state (rundir), logs (report), the loop (loop: `train`), `nabla train` (commands)."""

from __future__ import annotations


def __getattr__(name: str):
    # Imported on first use: `nabla --help` loads commands.py, which must not pull in torch.
    if name == "TrainConfig":
        from nabla.training.config import TrainConfig

        return TrainConfig
    if name == "train":
        from nabla.training.loop import train

        return train
    raise AttributeError(f"module 'nabla.training' has no attribute {name!r}")


__all__ = ["TrainConfig", "train"]
