"""Staged training: the shared loop (DDP, AMP, EMA, checkpoints, metrics) and the two stages."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import TrainingDiverged, TrainLoop
from .stages import train_stage1, train_stage2

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "TrainingDiverged",
           "TrainLoop", "train_stage1", "train_stage2"]
