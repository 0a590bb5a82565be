"""DINOv2 pretraining (backbone, heads, losses, data, FSDP2, checkpoints). Not built yet."""
