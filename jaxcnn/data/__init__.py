"""Datasets (sources → ArrayDataset / RandomAccessSource), the input pipeline and augmentation."""

from jaxcnn.data.dataset import (
    DATASET_INFO,
    ArrayDataset,
    DatasetInfo,
    DatasetNotFoundError,
    RandomAccessSource,
    dataset_info,
    list_datasets,
    load_split,
)
from jaxcnn.data.pipeline import DeviceEpochLoader, DeviceEvalSet, epoch_permutation, eval_batches, train_val_split
