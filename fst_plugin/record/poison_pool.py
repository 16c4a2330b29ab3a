"""Which of a record's ``bd_train`` images carry the attack: the one rule for the retuning attack and QRA.

``poison_indicator`` alone does not say it. BackdoorBench's WaNet and InputAware rebuild ``bd_train`` after
training and flag, beside the backdoor-warped images (target label), ``cross_ratio`` times as many *noise*-warped
images that keep their true label (``attack/wanet.py``, the block that calls ``set_one_bd_sample``). Taking every
flagged image would hand the retuning attack images that teach nothing of the backdoor. So:

* **dirty-label** record (some flagged image has ``bd_label != original_label``, all-to-one or all-to-all such as
  ``bd_label = (y + 1) mod C``): the pool is exactly the flagged images whose label changed; cross and noise
  samples, which keep theirs, are never in it;
* **clean-label** record (SIG, LC: no flagged image changes its label): the pool is the flagged images of the
  target class(es), the targets read off ``bd_test``'s backdoor labels.

A record without ``bd_train`` (BackdoorBench's blind and lira save ``None``) or whose pool is empty is refused
in one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fst_plugin.errors import RecordError
from fst_plugin.record.attack_record import AttackRecord, PoisonedImage

DIRTY_LABEL = "dirty-label"
CLEAN_LABEL = "clean-label"


@dataclass(frozen=True)
class PoisonPool:
    """The images that carry the attack, ordered by original index, and how they were chosen."""

    rule: str                        # DIRTY_LABEL or CLEAN_LABEL
    images: tuple[PoisonedImage, ...]
    flagged: int                     # images with poison_indicator = 1
    targets: tuple[int, ...]         # the backdoor labels of the pool

    @property
    def excluded(self) -> int:
        """Flagged images left out (cross / noise samples, or flagged images outside the target class)."""
        return self.flagged - len(self.images)

    def summary(self) -> dict[str, Any]:
        """What ``run_info.json`` records of the pool."""
        return {"rule": self.rule, "size": len(self.images), "flagged": self.flagged, "excluded": self.excluded,
                "targets": list(self.targets)}


def poisoned_pool(record: AttackRecord) -> PoisonPool:
    """The poisoned training images of ``record`` by the rule above, or one ``RecordError``."""
    if record.bd_train is None:
        raise RecordError(f"attack record {record.record_dir} has no bd_train (its poisoned training images; "
                          "BackdoorBench's blind and lira save none)",
                          "the retuning attack and QRA need the attack's poisoned training set: use a record "
                          "written with bd_train")
    flagged = sorted(record.bd_train.images, key=lambda img: img.original_index)
    relabelled = tuple(img for img in flagged if img.bd_label != img.original_label)
    if relabelled:
        rule, images = DIRTY_LABEL, relabelled
    else:
        targets = record.target_labels
        rule, images = CLEAN_LABEL, tuple(img for img in flagged if img.original_label in targets)
    if not images:
        raise RecordError(f"attack record {record.record_dir} has no poisoned training image ({len(flagged)} flagged, "
                          "none relabelled and none of the target class)",
                          "use a record whose bd_train holds the attack's poisoned images")
    return PoisonPool(rule, images, len(flagged), tuple(sorted({img.bd_label for img in images})))
