"""Datasets (sources → ArrayDataset / RandomAccessSource), the input pipeline and augmentation.

Imports run one way: `dataset` (types, what we know of each dataset) <- `sources` (readers, `load_split`);
`dataset` <- `pipeline` <- `streaming`; `augment` stands alone.
"""

from jaxcnn.data.dataset import (
    DATASET_INFO,
    ArrayDataset,
    DatasetInfo,
    DatasetNotFoundError,
    RandomAccessSource,
    dataset_info,
    list_datasets,
)
from jaxcnn.data.pipeline import DeviceEpochLoader, DeviceEvalSet, epoch_permutation, eval_batches, train_val_split
from jaxcnn.data.sources import load_split
