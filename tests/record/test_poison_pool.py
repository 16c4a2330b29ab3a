"""The poisoned-pool rule (record/poison_pool.py) on bd_train states shaped as BackdoorBench's attacks write
them: BadNets (dirty-label, all-to-one), WaNet / InputAware (backdoor images plus flagged cross samples that keep
their true label), SIG (clean-label), all-to-all (``bd_label = (y + 1) mod C``), and blind / lira (``bd_train =
None``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fst_plugin.errors import RecordError
from fst_plugin.record import AttackRecord, PoisonedImage, PoisonedSplit
from fst_plugin.record.poison_pool import CLEAN_LABEL, DIRTY_LABEL, poisoned_pool

C, TARGET, N = 10, 0, 200
LABELS = np.arange(N) % C


def _split(items: list[tuple[int, int]]) -> PoisonedSplit:
    """A bd_train split whose flagged images are ``items`` (index, bd_label), in BackdoorBench's shape."""
    indicator = np.zeros(N, dtype=np.int64)
    images = []
    for index, bd_label in items:
        indicator[index] = 1
        images.append(PoisonedImage(index, Path(f"/nowhere/{index}.png"), bd_label, int(LABELS[index])))
    return PoisonedSplit(images, np.arange(N), indicator)


def _record(bd_train: PoisonedSplit | None, test_targets: tuple[int, ...] = (TARGET,)) -> AttackRecord:
    bd_test = PoisonedSplit([PoisonedImage(i, Path(f"/t/{i}.png"), test_targets[i % len(test_targets)], 1 + i % 9)
                             for i in range(5)], np.arange(5), np.ones(5, dtype=np.int64))
    return AttackRecord(Path("/rec/x"), "preactresnet18", C, {}, "./data/cifar10", (32, 32, 3), "cifar10", bd_test,
                        bd_train)


def test_badnets_all_to_one_pool_is_every_relabelled_image():
    chosen = [i for i in range(N) if LABELS[i] != TARGET][:20]
    pool = poisoned_pool(_record(_split([(i, TARGET) for i in chosen])))
    assert pool.rule == DIRTY_LABEL and [img.original_index for img in pool.images] == chosen
    assert pool.summary() == {"rule": DIRTY_LABEL, "size": 20, "flagged": 20, "excluded": 0, "targets": [TARGET]}


def test_wanet_cross_samples_are_never_in_the_pool():
    """attack/wanet.py, batch by batch of an unshuffled loader: the first pratio*bs images get the warp and the
    target label, the next cross_ratio (2) times as many a noise warp and their own label; all are flagged."""
    items, bs, n_bd, n_cross = [], 40, 4, 8
    for start in range(0, N, bs):
        items += [(i, TARGET) for i in range(start, start + n_bd)]
        items += [(i, int(LABELS[i])) for i in range(start + n_bd, start + n_bd + n_cross)]
    pool = poisoned_pool(_record(_split(items)))
    backdoor = sorted(i for i, label in items if label != LABELS[i])
    assert pool.rule == DIRTY_LABEL
    assert [img.original_index for img in pool.images] == backdoor
    assert all(img.bd_label == TARGET for img in pool.images)
    assert pool.flagged == len(items) and pool.excluded == len(items) - len(backdoor)
    # the target-class images the warp reaches keep their label too: like cross samples, they teach no flip
    assert all(LABELS[img.original_index] != TARGET for img in pool.images)


def test_sig_clean_label_pool_is_the_flagged_images_of_the_target_class():
    target_class = [i for i in range(N) if LABELS[i] == TARGET][:10]
    stray = [i for i in range(N) if LABELS[i] == 3][:2]  # flagged outside the target (not in SIG, but possible)
    pool = poisoned_pool(_record(_split([(i, int(LABELS[i])) for i in target_class + stray])))
    assert pool.rule == CLEAN_LABEL
    assert [img.original_index for img in pool.images] == target_class and pool.excluded == 2
    assert pool.targets == (TARGET,)


def test_all_to_all_pool_is_every_relabelled_image_with_its_own_target():
    chosen = list(range(0, N, 7))
    pool = poisoned_pool(_record(_split([(i, int((LABELS[i] + 1) % C)) for i in chosen]), test_targets=(1, 2, 3)))
    assert pool.rule == DIRTY_LABEL and [img.original_index for img in pool.images] == chosen
    assert len(pool.targets) == C


@pytest.mark.parametrize("bd_train, message", [
    (None, "has no bd_train"),
    (_split([]), "no poisoned training image"),
    (_split([(3, 3), (13, 3)]), "none relabelled and none of the target class"),
])
def test_a_record_with_no_pool_is_refused_in_one_line(bd_train, message):
    with pytest.raises(RecordError) as err:
        poisoned_pool(_record(bd_train))
    assert message in str(err.value) and "\n" not in str(err.value)
