"""Fine-tuning engine: encoding, batching, the training loop and run directories."""

from recreason.training.config import TrainConfig

__all__ = ["TrainConfig"]
