"""Datasets and transforms with BackdoorBench's semantics, usable without BackdoorBench; the tensor data path."""
from fst_plugin.data.datasets import PoisonedTestSet, TransformedDataset, load_clean_split, materialise
from fst_plugin.data.tensor_data import TensorBatches, TensorImages, decode, fits_tensor_path
from fst_plugin.data.transforms import DATASETS, DatasetInfo, dataset_info, get_transform

__all__ = ["DATASETS", "DatasetInfo", "PoisonedTestSet", "TensorBatches", "TensorImages", "TransformedDataset",
           "dataset_info", "decode", "fits_tensor_path", "get_transform", "load_clean_split", "materialise"]
