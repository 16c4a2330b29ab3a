"""What a campaign runs at each scale: ``gpu`` (the paper-scale campaign for one GPU) and ``tiny`` (all of it on
the CPU in a few minutes, for CI). A profile names the bench protocol, the records, how many jobs share the
device, and the stage estimates with the measured figures they rest on (``figures``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from bench_scripts.campaign import figures as fig
from bench_scripts.protocols import BB_METHODS, cache_folder_of, get_protocol

HELLO_KITTY = "resource/blended/hello_kitty.jpeg"   # in a BackdoorBench checkout; read there, never copied

# FST runs the alpha variants cost per record: alpha auto's reference and up to 3 candidates plus its final run, and
# strength 2's one run (protocols.ALPHA_VARIANTS)
ALPHA_RUNS = 6


@dataclass(frozen=True)
class RecordSpec:
    """One attack record of the campaign: ``attack:rate``, keyed by BackdoorBench's Hello-Kitty image or not."""

    attack: str
    rate: float
    hello_kitty: bool = False

    @property
    def item(self) -> str:
        return f"{self.attack}:{self.rate:g}"

    def name(self, seed: int = 0) -> str:
        key = "-hello_kitty" if self.hello_kitty else ""
        return f"{self.attack}{key}_{self.rate:g}_s{seed}"

    @property
    def label(self) -> str:
        return f"{self.attack} {100 * self.rate:g}%" + (" (Hello-Kitty key)" if self.hello_kitty else
                                                         " (noise key)" if self.attack == "blended" else "")


RECORDS = (RecordSpec("sig", 0.01), RecordSpec("blended", 0.01, hello_kitty=True), RecordSpec("badnets", 0.01),
           RecordSpec("blended", 0.01))
CLEAN_REFERENCE = RecordSpec("badnets", 0.0)  # rate 0: the clean model retune and QRA compare against


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str                       # how the estimate follows from measured figures
    min_s: Optional[float] = None    # the least time worth starting the stage with (None: all of ``seconds``)


@dataclass(frozen=True)
class Profile:
    name: str
    protocol: str                      # the bench protocol (bench_scripts/protocols.py)
    device: str
    epochs: int                        # attack epochs of the records
    record_set: tuple[str, ...]        # --set overrides of the records' protocol (besides epochs)
    smoke_set: tuple[str, ...]         # --set overrides that make the smoke's tiny records
    speed_set: tuple[str, ...]         # --set overrides that make the speed stage's record
    speed_args: tuple[str, ...]        # arguments of bench_scripts.speed
    checkpoint_every: int              # attack epochs between checkpoints
    jobs: int                          # processes sharing the device (records, defenses side by side)
    compile: bool                      # torch.compile (CUDA graphs) in attack training, if the smoke shows it works
    builtin_cap_s: int                 # time cap of one BackdoorBench built-in run
    budget_s: int                      # default --budget-s
    estimates: Callable[["Profile", bool], dict[str, Estimate]]   # (profile, whether the built-ins run)

    @property
    def protocol_set(self) -> tuple[str, ...]:
        """The --set items every step on the records passes: ``record_set`` and the records' epochs."""
        return (*self.record_set, f"epochs={self.epochs}")

    @property
    def records_folder(self) -> str:
        """The records' folder under the cache (``Protocol.cache_folder``)."""
        return cache_folder_of(self.protocol, self.protocol_set)

    @property
    def smoke_folder(self) -> str:
        """The smoke stage's tiny records' folder under its own cache."""
        return cache_folder_of(self.protocol, self.smoke_set)

    @property
    def speed_folder(self) -> str:
        """The speed stage's record's folder under its own cache."""
        return cache_folder_of(self.protocol, self.speed_set)


def _interpolate_side_by_side(jobs: int) -> float:
    """Seconds per attack epoch of each record with ``jobs`` records side by side (measured at 1, 3 and 5)."""
    points = [(1, fig.ATTACK_EPOCH_ALONE.seconds), (3, fig.ATTACK_EPOCH_THREE_SIDE_BY_SIDE.seconds),
              (5, fig.ATTACK_EPOCH_FIVE_SIDE_BY_SIDE.seconds)]
    for (j0, s0), (j1, s1) in zip(points, points[1:]):
        if jobs <= j1:
            return s0 + (s1 - s0) * (max(jobs, j0) - j0) / (j1 - j0)
    return points[-1][1] * jobs / points[-1][0]


def _gpu_estimates(p: Profile, builtins: bool = False) -> dict[str, Estimate]:
    """``builtins``: BackdoorBench's built-ins run (a checkout was given), so their models are retuned too."""
    epoch = _interpolate_side_by_side(min(p.jobs, len(RECORDS)))
    models = len(RECORDS) * 9  # none, five modes, FST at lr 0.05, PAM, FST + PAM
    half_defense = fig.FST_DEFENSE.seconds / 2
    retuned = 8 + (len(BB_METHODS) if builtins else 0)   # per record: none, five modes, PAM, FST + PAM, built-ins
    qra_runs = retuned * fig.QRA_SHARE
    qra_each = half_defense * fig.QRA_ON_CPU.seconds / fig.RETUNE_ON_CPU.seconds
    pam_epochs = get_protocol(p.protocol).pam_epochs
    return {
        "smoke": Estimate(2 * fig.RECORD_OVERHEAD.seconds + 12 * fig.FST_EPOCH_IN_DEFENSE.seconds + 15,
                          f"2 tiny records x {fig.RECORD_OVERHEAD.seconds} s record overhead [{fig.RECORD_OVERHEAD.source}]"
                          f" + 12 one-epoch runs x {fig.FST_EPOCH_IN_DEFENSE.seconds} s, a full-scale FST epoch "
                          f"[{fig.FST_EPOCH_IN_DEFENSE.source}] + 15 s torchrun start (unmeasured)"),
        "speed": Estimate(fig.RECORD_OVERHEAD.seconds + 6 * fig.FST_EPOCH_IN_DEFENSE.seconds
                          + 0.3 * fig.COMPUTE_LIMIT_10_EPOCHS.seconds + 1.5 * fig.ATTACK_EPOCH_ALONE.seconds + 15,
                          f"record {fig.RECORD_OVERHEAD.seconds} s + 2 paths x 3 FST epochs x "
                          f"{fig.FST_EPOCH_IN_DEFENSE.seconds} s + 3/10 of the limit {fig.COMPUTE_LIMIT_10_EPOCHS.seconds}"
                          f" s [{fig.COMPUTE_LIMIT_10_EPOCHS.source}] + 1.5 attack epochs x "
                          f"{fig.ATTACK_EPOCH_ALONE.seconds} s [{fig.ATTACK_EPOCH_ALONE.source}] + 15 s decoding"),
        "records": Estimate(p.epochs * epoch + fig.RECORD_OVERHEAD.seconds, min_s=3 * epoch + 30, basis=
                            f"{p.epochs} epochs x {epoch:.1f} s per epoch with {min(p.jobs, len(RECORDS))} records side "
                            f"by side, interpolated from [{fig.ATTACK_EPOCH_THREE_SIDE_BY_SIDE.source}] and "
                            f"[{fig.ATTACK_EPOCH_FIVE_SIDE_BY_SIDE.source}]; before the device-side augmentation, "
                            "fused SGD and CUDA graphs, which the issue's 6-minute target needs to be 3x faster"),
        "defenses": Estimate(fig.FIVE_MODES.seconds + fig.FST_DEFENSE.seconds, min_s=fig.FST_DEFENSE.seconds, basis=
                             f"records side by side: five modes [{fig.FIVE_MODES.source}] + FST at lr 0.05 "
                             f"[{fig.FST_DEFENSE.source}]"),
        "builtins": Estimate(len(BB_METHODS) * p.builtin_cap_s, min_s=p.builtin_cap_s, basis=
                             f"{len(BB_METHODS)} built-ins x their cap {p.builtin_cap_s} s, records side by side "
                             "(never measured on a GPU)"),
        "reference": Estimate(p.epochs * fig.ATTACK_EPOCH_ALONE.seconds + fig.RECORD_OVERHEAD.seconds,
                              min_s=3 * fig.ATTACK_EPOCH_ALONE.seconds + 30, basis=
                              f"{p.epochs} epochs x {fig.ATTACK_EPOCH_ALONE.seconds} s [{fig.ATTACK_EPOCH_ALONE.source}]"),
        "retune": Estimate(retuned * half_defense + qra_runs * qra_each, min_s=half_defense, basis=
                           f"{retuned} models per record (none, five modes, PAM, FST + PAM"
                           f"{f', {len(BB_METHODS)} built-ins' if builtins else ''}), records side by side, each a "
                           f"5-epoch retune = half a 10-epoch defense, {half_defense:.1f} s [{fig.FST_DEFENSE.source}]; "
                           f"then QRA on the purified share {fig.QRA_SHARE:.2f} of them ({qra_runs:.1f}), each "
                           f"{fig.QRA_ON_CPU.seconds / fig.RETUNE_ON_CPU.seconds:.1f} retunes = {qra_each:.0f} s as "
                           f"on the CPU [{fig.QRA_ON_CPU.source}; {fig.RETUNE_ON_CPU.source}]"),
        "pam": Estimate((pam_epochs / 10 + 1 + ALPHA_RUNS) * fig.FST_DEFENSE.seconds, min_s=fig.FST_DEFENSE.seconds,
                        basis=f"pam's {pam_epochs} epochs and FST + PAM's 10 as 10-epoch FST defenses, and FST with "
                              f"alpha auto and strength 2 as {ALPHA_RUNS} more (auto's choice is up to 4 runs on 80% "
                              f"of the tuning set) [{fig.FST_DEFENSE.source}]; the trigger inversion never measured "
                              "on a GPU, so a lower bound"),
        "evaluate": Estimate(models * fig.EVALUATE_PER_MODEL.seconds,
                             f"{models} models x {fig.EVALUATE_PER_MODEL.seconds} s [{fig.EVALUATE_PER_MODEL.source}]"),
        "table": Estimate(fig.TINY_TABLE.seconds, f"CPU work on the CSVs [{fig.TINY_TABLE.source}]"),
        "collect": Estimate(5, "copies at most 8 files (no device work)"),
    }


def _tiny_estimates(p: Profile, builtins: bool = False) -> dict[str, Estimate]:
    """The tiny campaign's stages as measured (stage walls of one run on the shared CPU; its built-ins are skipped:
    BackdoorBench cannot build the tiny model)."""
    measured = {"smoke": fig.TINY_SMOKE, "speed": fig.TINY_SPEED, "records": fig.TINY_RECORDS,
                "defenses": fig.TINY_DEFENSES, "reference": fig.TINY_REFERENCE, "retune": fig.TINY_RETUNE,
                "pam": fig.TINY_DEFENSES, "evaluate": fig.TINY_EVALUATE, "table": fig.TINY_TABLE}
    out = {name: Estimate(figure.seconds, f"[{figure.source}]", min_s=figure.seconds / 4)
           for name, figure in measured.items()}
    out["builtins"] = Estimate(len(BB_METHODS) * p.builtin_cap_s, min_s=p.builtin_cap_s, basis=
                               f"{len(BB_METHODS)} built-ins x their cap {p.builtin_cap_s} s (an upper bound, not "
                               "measured)")
    out["collect"] = Estimate(1, "copies at most 8 files")
    return out


PROFILES: dict[str, Profile] = {
    "gpu": Profile("gpu", protocol="gpu", device="cuda", epochs=100, record_set=(),
                   smoke_set=("epochs=1", "train_per_class=20", "test_per_class=5"),
                   speed_set=("epochs=1", "train_per_class=100"),
                   speed_args=("--epochs", "3", "--repeats", "1", "--attack-images", "50000", "--amp"),
                   checkpoint_every=5, jobs=4, compile=True, builtin_cap_s=90, budget_s=540,
                   estimates=_gpu_estimates),
    # 50 images per class: 5 poisoned at 1%, as many as retune takes; 3 defense epochs: make_table's epoch-3 target;
    # 10% of the 500 training images to tune on
    "tiny": Profile("tiny", protocol="tiny", device="cpu", epochs=3,
                    record_set=("train_per_class=50", "defense_epochs=3", "defense_ratio=0.1"),
                    smoke_set=("epochs=1", "train_per_class=4", "test_per_class=2"),
                    speed_set=("epochs=1",),
                    speed_args=("--epochs", "1", "--repeats", "1", "--attack-images", "100"),
                    checkpoint_every=1, jobs=2, compile=False, builtin_cap_s=60, budget_s=600,
                    estimates=_tiny_estimates),
}


def get_profile(name: str) -> Optional[Profile]:
    return PROFILES.get(name)
