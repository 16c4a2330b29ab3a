"""Stand-in: shapes, class counts, transforms and the clean splits of CIFAR-10 (image folders or batches)."""
import os

import torchvision.transforms as transforms
from torchvision.datasets import CIFAR10, ImageFolder

SHAPES = {"cifar10": (32, 32, 3)}
CLASSES = {"cifar10": 10}
NORMALIZATION = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))}


def get_num_classes(dataset_name):
    return CLASSES[dataset_name]


def get_input_shape(dataset_name):
    return SHAPES[dataset_name]


def get_transform(dataset_name, input_height, input_width, train=True, random_crop_padding=4):
    steps = [transforms.Resize((input_height, input_width))]
    if train:
        steps.append(transforms.RandomCrop((input_height, input_width), padding=random_crop_padding))
        if dataset_name == "cifar10":
            steps.append(transforms.RandomHorizontalFlip())
    mean, std = NORMALIZATION[dataset_name]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def _split(root, train):
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        return CIFAR10(root, train=train, download=False)
    return ImageFolder(os.path.join(root, "train" if train else "test"))


def dataset_and_transform_generate(args):
    """(train without transform, train transform, None, test without transform, test transform, None)."""
    height, width = args.img_size[:2]
    return (_split(args.dataset_path, True), get_transform(args.dataset, height, width, True), None,
            _split(args.dataset_path, False), get_transform(args.dataset, height, width, False), None)
