"""Training: corpus and tokens (data), learning-rate schedule (schedule), the loop (train), `nabla train` (commands)."""
