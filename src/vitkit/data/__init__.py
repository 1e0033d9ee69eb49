"""Datasets, safe image decoding and transforms.

`load_dataset(name, ...)` returns DataSplits: train / val / test datasets of (uint8 (C, H, W), label)
with the class names and the per-channel mean and std. `train_transform` / `eval_transform` turn
those images into normalised float tensors, `evaluation_set` a whole split (at once where it is in
memory); `batch_mixer` does mixup / CutMix on batches.
`load_image` decodes one file safely (BadImageError on anything unreadable), `decode_image` its bytes.
"""

from vitkit.data.decode import decode_image, load_image
from vitkit.data.errors import BadImageError, DataFileError, DatasetNotFoundError
from vitkit.data.image_folder import ImageFolderDataset, collate_skip_none
from vitkit.data.registry import DATASETS, load_dataset
from vitkit.data.splits import DataSplits, stratified_split
from vitkit.data.tensor_dataset import ImageTensorDataset
from vitkit.data.transforms import (
    Normalised,
    Transformed,
    batch_mixer,
    eval_transform,
    evaluation_set,
    train_transform,
)

__all__ = [
    "DATASETS", "BadImageError", "DataFileError", "DataSplits", "DatasetNotFoundError", "ImageFolderDataset",
    "ImageTensorDataset", "Normalised", "batch_mixer", "collate_skip_none", "decode_image", "eval_transform",
    "evaluation_set", "load_dataset", "load_image", "stratified_split", "train_transform", "Transformed",
]
