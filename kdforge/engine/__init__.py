"""The training engine: the loop, optimisers and schedules, checkpoints and logging."""
from kdforge.engine.checkpoint import atomic_save, load_checkpoint, seed_everything
from kdforge.engine.trainer import FitResult, NonFiniteLossError, Trainer

__all__ = ["FitResult", "NonFiniteLossError", "Trainer", "atomic_save", "load_checkpoint", "seed_everything"]
