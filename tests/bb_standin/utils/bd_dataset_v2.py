"""Stand-in: the poisoned-dataset wrapper (5-tuple items) and the transform wrapper."""
import numpy as np
import torch
from PIL import Image


class dataset_wrapper_with_transform(torch.utils.data.Dataset):
    def __init__(self, obj, wrap_img_transform=None, wrap_label_transform=None):
        self.wrapped_dataset = obj
        self.wrap_img_transform = wrap_img_transform
        self.wrap_label_transform = wrap_label_transform

    def __getitem__(self, index):
        img, label, *rest = self.wrapped_dataset[index]
        if self.wrap_img_transform is not None:
            img = self.wrap_img_transform(img)
        if self.wrap_label_transform is not None:
            label = self.wrap_label_transform(label)
        return (img, label, *rest)

    def __len__(self):
        return len(self.wrapped_dataset)


class prepro_cls_DatasetBD_v2(torch.utils.data.Dataset):
    """Items (img, label, original index, poisoned 0/1, original label); poisoned images come from PNG files."""

    def __init__(self, full_dataset_without_transform):
        self.dataset = full_dataset_without_transform
        self.original_index_array = np.arange(len(full_dataset_without_transform))
        self.poison_indicator = np.zeros(len(full_dataset_without_transform))
        self.poisoned = {}

    def set_state(self, state):
        self.original_index_array = state["original_index_array"]
        self.poison_indicator = state["poison_indicator"]
        self.poisoned = state["bd_data_container"]["data_dict"]

    def subset(self, chosen_index_list):
        self.original_index_array = self.original_index_array[chosen_index_list]

    def __getitem__(self, index):
        original_index = self.original_index_array[index]
        if self.poison_indicator[original_index] == 0:
            img, label = self.dataset[original_index]
            return img, label, original_index, 0, label
        entry = self.poisoned[original_index]
        with Image.open(entry["path"]) as img:
            image = img.copy()
        bd_label, label = entry["other_info"]
        return image, bd_label, original_index, 1, label

    def __len__(self):
        return len(self.original_index_array)
