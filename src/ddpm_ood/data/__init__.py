"""Data: split CSVs (splits), image loading and datasets (datasets), dataset families (sources) and their
preparation into .npy images and split CSVs (prepare). Data knows no model."""

from ddpm_ood.data.datasets import ImageDataset, dataset_from_csv, load_image
from ddpm_ood.data.splits import read_split_csv, write_split_csv

__all__ = ["ImageDataset", "dataset_from_csv", "load_image", "read_split_csv", "write_split_csv"]
