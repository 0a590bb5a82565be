"""DINOv2 pretraining and evaluation: backbone, heads, losses, data, FSDP2, checkpoints, the trainer,
k-NN / linear-probe evaluation, and their stages.

Importing this package registers the `pretrain`, `evaluate`, `pretrain_random` and `ablate_data` stages
with the spine's stage registry.
"""

from training import ablate, stages
from training.eval import stage as eval_stage

__all__ = ["ablate", "eval_stage", "stages"]
