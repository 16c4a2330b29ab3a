"""Stand-in: read an attack record (clean splits and the poisoned test set) and save a defense result."""
import torch

from utils.aggregate_block.dataset_and_transform_generate import dataset_and_transform_generate
from utils.bd_dataset_v2 import dataset_wrapper_with_transform, prepro_cls_DatasetBD_v2


class _Settings:
    pass


def load_attack_result(save_path):
    record = torch.load(save_path, weights_only=False)  # the test's own record
    settings = _Settings()
    settings.dataset, settings.dataset_path, settings.img_size = record["clean_data"], record["data_path"], record["img_size"]
    train, train_tran, _, test, test_tran, _ = dataset_and_transform_generate(settings)
    bd_test = prepro_cls_DatasetBD_v2(test)
    bd_test.set_state(record["bd_test"])
    return {
        "model_name": record["model_name"],
        "model": record["model"],
        "clean_train": dataset_wrapper_with_transform(train, train_tran),
        "clean_test": dataset_wrapper_with_transform(test, test_tran),
        "bd_train": None,
        "bd_test": dataset_wrapper_with_transform(bd_test, test_tran),
    }


def save_defense_result(model_name, num_classes, model, save_path):
    torch.save({"model_name": model_name, "num_classes": num_classes, "model": model}, f"{save_path}/defense_result.pt")
