"""Benchmark protocols: which model, attack schedule, defense settings and grid a run uses.

* ``cpu``  — real CIFAR-10 on a 2-core CPU: half-width ResNet-9 (``resnet9_cpu``, bf16 trunk on CPUs that
  support it), 10 epochs of one-cycle SGD (≈80 s per epoch on an idle 2-core AVX512-BF16 machine, 4x more
  when other jobs share it), defenses with the paper's
  hyper-parameters (2% clean data, 10 epochs, lr 0.01, alpha 0.2) and per-epoch curves on a fixed seeded
  test subset (the final numbers always come from ``evaluate.py`` on the full test sets).
* ``gpu``  — the paper's scale: PreActResNet18 trained with BackdoorBench's CIFAR-10 attack schedule exactly
  (``config/attack/prototype/cifar10.yaml``: 100 epochs, batch 128, SGD lr 0.01, momentum 0.9, no Nesterov,
  wd 5e-4, CosineAnnealingLR stepped per epoch, random crop 4 + horizontal flip), AMP (BackdoorBench's
  ``amp: False``; a precision choice, not part of the schedule), full test sets every epoch.
* ``gpu-fast`` — the same model and defenses, attack trained 30 epochs one-cycle SGD (Nesterov) at lr 0.05: what
  the 2026-11-25 H100 run measured (``bench_results/gpu/``), to fit the time; not BackdoorBench's schedule.
* ``tiny`` — a few hundred images and one epoch, for the tests: proves the pipeline, measures nothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from bench_scripts.jobs.job import Resources
from fst_plugin.defense.config import DefenseConfig
from fst_plugin.probes.config import OWN_SUBSET

# the fields that decide what a record's attack training makes: a record trained under other values is another record
RECORD_FIELDS = ("model", "epochs", "batch_size", "lr", "momentum", "nesterov", "schedule", "weight_decay",
                 "label_smoothing", "amp", "train_per_class", "test_per_class")

# the package's five tuning modes
METHODS = ("lp", "vanilla-ft", "fe-tuning", "ft-init", "fst")


@dataclass(frozen=True)
class BuiltIn:
    """One of BackdoorBench's post-training defenses as the grid runs it: ``defense/<name>.py`` with its own
    ``config/defense/<name>/cifar10.yaml``, the protocol's clean ratio where it takes one (``ratio``), its
    yaml's length settings (``lengths``) capped at the protocol's ``bb_epochs``, and a wall-clock cap."""

    name: str
    cpu_cap_min: int                          # wall-clock cap on the 2-core CPU (protocol bb_cap_s: None)
    ratio: bool = True                        # takes --ratio, its clean training fraction
    lengths: tuple[str, ...] = ("epochs",)    # its yaml keys that set how long it trains
    models: Optional[tuple[str, ...]] = None  # None: any model generate_cls_model builds
    bound_by: str = ""                        # why only ``models``: the BackdoorBench code that ties it to them
    cuda_only: str = ""                       # why it needs CUDA: the BackdoorBench code that asks for it


# the architectures BackdoorBench's per-model switches know (ANP's get_anp_network, EP's get_dde_network, BNP's
# get_mbns_network rebuild the model with their own BatchNorm class; NAD picks layers per model name)
_SWITCH_MODELS = ("preactresnet18", "vgg19_bn", "densenet161", "mobilenet_v3_large", "efficientnet_b3",
                  "convnext_tiny", "vit_b_16")
BUILTINS = (
    BuiltIn("ft", 30),
    BuiltIn("ft-sam", 30),
    BuiltIn("i-bau", 30, lengths=("n_rounds",),
            cuda_only="defense/i-bau.py's loss_outer builds its patch with torch.zeros_like(images, device='cuda') "
                      "('TODO: cpu training')"),
    BuiltIn("clp", 20, ratio=False, lengths=()),                  # data-free: prunes from the weights alone
    BuiltIn("nc", 60, lengths=("epochs", "nc_epoch")),
    BuiltIn("sau", 30, lengths=("n_rounds",)),
    BuiltIn("fp", 45),
    BuiltIn("nad", 30, lengths=("epochs", "te_epochs"), models=(*_SWITCH_MODELS, "vgg19", "resnet18"),
            bound_by="defense/nad.py computes its attention-transfer loss only inside `if args.model == "
                     "'preactresnet18'` / 'vgg19' / ... branches that name each model's layers"),
    BuiltIn("anp", 45, lengths=(), models=_SWITCH_MODELS,
            bound_by="defense/anp.py's get_anp_network rebuilds the model with NoisyBatchNorm2d for "
                     + ", ".join(_SWITCH_MODELS) + " only (else SystemError)"),
    BuiltIn("ep", 10, ratio=False, lengths=(), models=_SWITCH_MODELS,
            bound_by="defense/ep.py's get_dde_network rebuilds the model with BatchNorm2d_DDE for "
                     + ", ".join(_SWITCH_MODELS) + " only (else SystemError)"),
    BuiltIn("bnp", 10, lengths=(), models=_SWITCH_MODELS,
            bound_by="defense/bnp.py's get_mbns_network rebuilds the model with BatchNorm2d_MBNS for "
                     + ", ".join(_SWITCH_MODELS) + " only (else SystemError)"),
    BuiltIn("npd", 45, models=("preactresnet18",),
            bound_by="defense/npd.py's prepare_polarizer asserts args.model == 'preactresnet18' and plugs its "
                     "polarizer at the yaml's target_layer_name layer4.1.conv1"),
)
BUILTIN = {b.name: b for b in BUILTINS}
BB_METHODS = tuple(BUILTIN)     # BackdoorBench's built-ins the grid runs from its checkout
# PAM (Min et al., NeurIPS 2024): the pam defense, and FST taking PAM's step and reversed samples ("fst-pam");
# variant -> the mode it runs (settings: pam_run)
PAM_VARIANTS = {"pam": "pam", "fst-pam": "fst"}
# FST with its alpha chosen on held-out clean tuning data (alpha: auto, docs/modes.md); variant -> (mode, settings)
# FST's alpha chosen per model: by the held-out search (auto), or as strength 2 (alpha = 2 / the backdoored head's
# squared norm; 2 from the 2026-11-25 alpha sweep on the cpu grid: alpha 0.05 there is about strength 2, with
# squared head norms of 40-45; docs/modes.md)
ALPHA_VARIANTS = {"fst-auto": ("fst", {"alpha": "auto"}), "fst-s2": ("fst", {"alpha": "strength=2"})}
GRID_VARIANTS = ("none", *METHODS, *PAM_VARIANTS, *ALPHA_VARIANTS, *BB_METHODS)  # the backdoored model ("none") and
# every defense
# QRA (evaluate --qra) asks whether a purified model can be reactivated: the grids run it on models whose ASR after
# the defense is at most this (--qra-max-asr); a model left backdoored has nothing to reactivate
QRA_MAX_ASR = 0.1
REINIT_METHODS = ("fst", "ft-init", "fe-tuning")  # the modes that re-initialise the head (the size ablation's)

# (attack, poisoning rate) pairs; the low-rate grid is what the paper's Table 1/2 claims are about.
CPU_GRID = (("badnets", 0.01), ("badnets", 0.005), ("badnets", 0.05), ("blended", 0.01), ("blended", 0.005),
            ("sig", 0.01), ("sig", 0.05), ("wanet", 0.05), ("wanet", 0.1), ("badnets", 0.1))
GPU_GRID = tuple((a, r) for a in ("badnets", "blended", "sig", "wanet") for r in (0.005, 0.01, 0.05, 0.1))


@dataclass(frozen=True)
class Protocol:
    name: str
    model: str
    device: str = "auto"
    # attack training (fst_plugin.attacks.train_classifier)
    epochs: int = 12
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "onecycle"              # "onecycle", or "cosine" = BackdoorBench's CosineAnnealingLR
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    amp: bool = False
    train_per_class: Optional[int] = None   # None: the whole training split
    test_per_class: Optional[int] = None    # None: the whole test split
    # defenses (the paper's CIFAR-10 hyper-parameters)
    defense_epochs: int = DefenseConfig.epochs             # the defaults are the defense config's (one owner)
    defense_ratio: float = DefenseConfig.ratio
    defense_lr: float = DefenseConfig.lr
    defense_batch_size: int = DefenseConfig.batch_size
    alpha: float = DefenseConfig.alpha
    # PAM's inversion settings on this protocol (both PAM variants; empty: the shipped yaml's, the authors')
    pam_settings: dict = dataclasses.field(default_factory=dict)
    pam_epochs: int = 90                    # the pam variant's unlearning epochs (fst-pam keeps defense_epochs)
    num_workers: int = 0
    eval_subset: Optional[int] = None       # per-epoch curve on this many clean + poisoned test images
    ablation_eval_subset: Optional[int] = None  # the same for ablation runs (their curves are not plotted)
    grid: tuple = CPU_GRID
    # ablations
    alphas: tuple = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    tuning_sizes: tuple = (50, 100, 250, 500)
    size_methods: tuple = REINIT_METHODS
    # projection matters where the head is re-initialised; LP / vanilla FT start at ||W0|| anyway
    projection_methods: tuple = (*REINIT_METHODS, "lp", "vanilla-ft")
    long_epochs: int = 20                   # the "longer tuning" check: does C-Acc keep recovering?
    long_methods: tuple = ("fst",)
    ablation_lrs: tuple = (0.05,)           # the "larger lr" check (the paper's lr is defense_lr = 0.01)
    tsne_points: int = 500                  # per group (target-class clean, poisoned) in diagnostics
    # BackdoorBench's built-ins (BUILTINS): their length settings capped at this many epochs (None: the yaml's)
    # and one wall-clock cap for each run (None: each built-in's cpu_cap_min)
    bb_epochs: Optional[int] = None
    bb_cap_s: Optional[int] = None
    # what one job of the grid holds (a record, a defense, a retune): its torch threads and GPUs (Ray's num_cpus /
    # num_gpus; bench_scripts/jobs)
    job_cpus: int = 1
    job_gpus: float = 0.0
    # the retune's and QRA's clean images (their --clean_subset): "defense", each defense's own tuning subset; "drawn",
    # one seeded draw at defense_ratio for every model (the authors' script), for defenses tuned on other subsets
    probe_subset: str = OWN_SUBSET
    notes: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def cache_folder(self) -> str:
        """The protocol's folder under ``--cache``: its name, then each record-defining field (``RECORD_FIELDS``)
        set away from the named protocol's value (``cpu+model=resnet18+epochs=30``), so records trained another way
        are never served from, or written over, the protocol's own."""
        base = PROTOCOLS.get(self.name)
        changed = [] if base is None else [f"{field}={getattr(self, field)}" for field in RECORD_FIELDS
                                           if getattr(self, field) != getattr(base, field)]
        return "+".join((self.name, *changed))

    @property
    def resources(self) -> Resources:
        """A job's share of a node (no GPU where the protocol is run on the CPU: ``--set device=cpu``)."""
        return Resources(self.job_cpus, 0.0 if self.device == "cpu" else self.job_gpus)


# the authors' PAM optimiser (fine_tune/BTIDBF/btidbfu.py: SGD lr 0.01, momentum 0.1, no schedule); fst-pam keeps FST's
PAM_OPTIMISER = {"lr": 0.01, "sgd_momentum": 0.1, "lr_scheduler": "ConstantLR"}
# PAM on the 2-core CPU runs at the authors' budget (the shipped yaml's inversion steps, 32-filter generator, 90
# unlearning epochs in 3 rounds) on the grid's clean data; the one change is precision: the trigger generator runs under
# bfloat16 autocast (amp), which halves its cost on CPUs with native bf16 (about 2 s instead of 4 s a step at batch 128).
# The earlier CPU scale-down (5 / 3 / 3 epochs, 16 filters, 15 epochs) is not run any more: a scaled-down inversion is
# not PAM.
CPU_PAM = {"amp": True}

PROTOCOLS: dict[str, Protocol] = {
    "cpu": Protocol("cpu", model="resnet9_cpu", device="cpu", epochs=10, batch_size=256, lr=0.1,
                    eval_subset=2000, ablation_eval_subset=500, grid=CPU_GRID,
                    # trimmed to what fits a shared 2-core machine in one session; the gpu protocol runs all
                    # (alpha 0 is FT-init with projection, i.e. the grid's ft-init run: not repeated)
                    alphas=(0.05, 0.2, 0.5, 1.0), size_methods=("fst",), pam_settings=CPU_PAM,
                    projection_methods=REINIT_METHODS, bb_epochs=10, job_cpus=2,
                    notes="2-core CPU; per-epoch curves on 2000+2000 seeded test images"),
    "gpu": Protocol("gpu", model="preactresnet18", device="cuda", epochs=100, batch_size=128, lr=0.01,
                    momentum=0.9, nesterov=False, schedule="cosine", weight_decay=5e-4,
                    amp=True, num_workers=4, eval_subset=None, grid=GPU_GRID, job_cpus=4, job_gpus=1.0,
                    notes="paper scale; BackdoorBench's attack schedule"),
    "gpu-fast": Protocol("gpu-fast", model="preactresnet18", device="cuda", epochs=30, batch_size=128, lr=0.05,
                         momentum=0.9, nesterov=True, schedule="onecycle", weight_decay=5e-4,
                         amp=True, num_workers=4, eval_subset=None, grid=GPU_GRID, job_cpus=4, job_gpus=1.0,
                         notes="paper-scale model, attack shortened to 30 epochs one-cycle lr 0.05 "
                               "(the 2026-11-25 H100 run); not BackdoorBench's schedule"),
    "tiny": Protocol("tiny", model="preactresnet_small", device="cpu", epochs=1, batch_size=64, lr=0.05,
                     train_per_class=40, test_per_class=10, defense_epochs=2, defense_ratio=0.25,
                     defense_batch_size=32, eval_subset=40, grid=(("badnets", 0.1), ("blended", 0.1)),
                     alphas=(0.0, 0.2), tuning_sizes=(20,), tsne_points=20, bb_epochs=1,
                     pam_epochs=2, pam_settings={"unlearn_rounds": 2, "inversion_pretrain_steps": 1,
                                   "inversion_mask_steps": 1, "inversion_generator_steps": 1, "generator_filters": 4},
                     notes="pipeline test only"),
}


def get_protocol(name: str, **overrides) -> Protocol:
    """A protocol by name, with fields overridden (``epochs=1`` …) for quick checks."""
    if name not in PROTOCOLS:
        raise SystemExit(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return dataclasses.replace(PROTOCOLS[name], **{k: v for k, v in overrides.items() if v is not None})


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--set`` items (``KEY=VALUE``, values parsed as YAML; a list becomes a tuple) as protocol field overrides."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE items, got {item!r}")
        parsed = yaml.safe_load(value)
        overrides[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return overrides


def cache_folder_of(name: str, sets: Iterable[str]) -> str:
    """The cache folder of protocol ``name`` under the ``--set`` items ``sets`` (``Protocol.cache_folder``)."""
    return get_protocol(name, **parse_overrides(sets)).cache_folder


def pam_run(variant: str, protocol: Protocol) -> tuple[str, dict]:
    """The mode and config overrides of a PAM variant on ``protocol``: its inversion settings, PAM switched on, and
    for the pam variant the authors' optimiser and the protocol's pam_epochs (fst-pam keeps FST's optimiser)."""
    mode = PAM_VARIANTS[variant]
    settings = {**protocol.pam_settings, "pam": "on"}
    if mode == "pam":
        settings.update(PAM_OPTIMISER, epochs=protocol.pam_epochs)
    return mode, settings
