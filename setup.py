"""backdoorbench-fst: Feature Shift Tuning and its baselines as installable BackdoorBench defenses."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="backdoorbench-fst",
    version="0.1.0",
    description="Feature Shift Tuning (NeurIPS 2023), FE-tuning, FT-init, LP and vanilla FT as BackdoorBench defenses",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fst_plugin", "fst_plugin.*"]) + ["fst_plugin.defense_configs"],
    package_dir={"fst_plugin.defense_configs": "defense_configs"},
    package_data={"fst_plugin.defense_configs": ["*/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "pandas",
        "matplotlib",
        "pyyaml",
        "tqdm",
        "tabulate",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "scikit-learn"],
        "bench": ["scikit-learn"],
    },
    entry_points={
        "console_scripts": ["fst-plugin = fst_plugin.cli:main"],
        "backdoorbench.defenses": [
            "fst = fst_plugin.adapter.defenses:FST",
            "fe-tuning = fst_plugin.adapter.defenses:FETuning",
            "ft-init = fst_plugin.adapter.defenses:FTInit",
            "lp = fst_plugin.adapter.defenses:LP",
            "vanilla-ft = fst_plugin.adapter.defenses:VanillaFT",
        ],
    },
)
