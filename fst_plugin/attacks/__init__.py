"""Making backdoored models, for the demo, the tests and the benchmarks.

* ``triggers``: BackdoorBench's triggers on uint8 images and the poisoning of a training split;
* ``training``: the attack trainer (data, crop and flip on the device; AMP, channels_last, CUDA graphs on CUDA);
* ``checkpoint``: its checkpoints, deadline and resume;
* ``record_writer``: poison, train, measure and write a BackdoorBench attack record in one call.
"""
from fst_plugin.attacks.checkpoint import Checkpointing, TrainingPaused, read_progress
from fst_plugin.attacks.record_writer import (
    Attack,
    BackdooredModel,
    Split,
    backdoor_and_record,
    poisoned_test_items,
)
from fst_plugin.attacks.training import (
    TrainConfig,
    accuracy_and_asr,
    predict,
    stamp_after_augment,
    to_tensor_batch,
    train_classifier,
)
from fst_plugin.attacks.triggers import (
    PoisonedData,
    Trigger,
    badnets_trigger,
    blend_pattern,
    blended_trigger,
    class_balanced_subset,
    poison_indices,
    poison_split,
    sig_trigger,
    wanet_trigger,
)

__all__ = [
    "Attack", "BackdooredModel", "Checkpointing", "PoisonedData", "Split", "TrainConfig", "TrainingPaused",
    "Trigger", "accuracy_and_asr", "backdoor_and_record", "badnets_trigger", "blend_pattern", "blended_trigger",
    "class_balanced_subset", "poison_indices", "poison_split", "poisoned_test_items", "predict", "read_progress",
    "sig_trigger", "stamp_after_augment", "to_tensor_batch", "train_classifier", "wanet_trigger",
]
