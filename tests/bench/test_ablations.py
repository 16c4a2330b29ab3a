"""The ablation variants (bench_scripts.defenses.ablations.variants): every one is a valid config override, so no variant
fails only when its turn comes in a long benchmark run (the lr variant once passed argv strings)."""
from pathlib import Path

import pytest

from bench_scripts.defenses.ablations import variants
from bench_scripts.protocols import PROTOCOLS
from fst_plugin.defense.config import build_config, read_yaml
from fst_plugin.defense.shipped import shipped_config


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_every_ablation_variant_is_a_config_override_the_defense_accepts(protocol: str, tmp_path: Path) -> None:
    found = variants(tmp_path, tmp_path, PROTOCOLS[protocol], ["alpha", "epochs", "lr", "projection"], seed=0)
    names = [name for _, name, _ in found]
    assert any("_lr" in n for n in names) and any(n.endswith(f"_e{PROTOCOLS[protocol].long_epochs}") for n in names)
    for method, name, extra in found:
        assert isinstance(extra, dict), f"{name}: {extra!r} is not a mapping of config keys"
        shipped = read_yaml(shipped_config(method, "cifar10"))
        config, default = build_config({**shipped, **extra}), build_config(shipped)
        for key in extra:  # the override is taken, and it changes the shipped setting
            assert getattr(config, key) != getattr(default, key), (name, key)
