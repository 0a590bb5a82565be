"""Training data: multi-crop augmentation, iBOT block masks, collation and the resumable loader."""

from training.data.augment import MultiCropAugmentation
from training.data.collate import collate_crops_and_masks
from training.data.dataset import CuratedImages, ImageLoadError, make_train_loader
from training.data.masking import MaskingGenerator, official_max_num_patches

__all__ = [
    "CuratedImages",
    "ImageLoadError",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "collate_crops_and_masks",
    "make_train_loader",
    "official_max_num_patches",
]
