"""BackdoorBench's on-disk formats: attack records in, defense results out."""
from fst_plugin.record.attack_record import (
    AttackRecord,
    PoisonedImage,
    PoisonedSplit,
    load_attack_record,
    parse_attack_result,
    write_attack_record,
)
from fst_plugin.record.clean_subset import choose_clean_indices
from fst_plugin.record.poison_pool import PoisonPool, poisoned_pool
from fst_plugin.record.safe_load import load_untrusted

__all__ = ["AttackRecord", "PoisonedImage", "PoisonedSplit", "PoisonPool", "choose_clean_indices",
           "load_attack_record", "load_untrusted", "parse_attack_result", "poisoned_pool", "write_attack_record"]
