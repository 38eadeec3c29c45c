"""Data sources: every dataset as uint8 tensors in memory, found on disk, split stratified and seeded.

Importing this package registers every source in ``DATASETS`` (one module per format)."""
from . import idx, cifar, imagefolder, npz, volumes, synthetic  # noqa: F401,I001  (registration, catalogue order)
from .base import DATASETS, ArrayDataset, DataBundle
from .dedupe import leakage_line, phash
from .download import download
from .load import load_dataset
from .locate import find_root
from .splits import dataset_digest, make_splits, split_from_json, split_to_json, stratified_split

__all__ = ["DATASETS", "ArrayDataset", "DataBundle", "dataset_digest", "download", "find_root", "leakage_line",
           "load_dataset", "make_splits", "phash", "split_from_json", "split_to_json", "stratified_split"]
