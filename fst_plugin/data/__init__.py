"""Datasets and transforms with BackdoorBench's semantics, usable without BackdoorBench."""
from fst_plugin.data.datasets import PoisonedTestSet, TransformedDataset, load_clean_split, materialise
from fst_plugin.data.transforms import DATASETS, DatasetInfo, dataset_info, get_transform

__all__ = ["DATASETS", "DatasetInfo", "PoisonedTestSet", "TransformedDataset", "dataset_info", "get_transform", "load_clean_split",
           "materialise"]
