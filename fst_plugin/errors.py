"""User-facing errors.

Every problem a user can cause (a bad record, yaml, dataset, model or install target) is raised as an
:class:`FSTError` whose message is one line naming the problem and the fix. The CLI turns it into exit
code 2 without a traceback; anything else is a bug in this package.
"""
from __future__ import annotations


class FSTError(Exception):
    """A problem with the user's input, with the fix to apply."""

    def __init__(self, problem: str, fix: str) -> None:
        # one line, whatever the values quoted in it (a tensor's or array's repr spans several)
        self.problem = " ".join(problem.split()).rstrip(". ")
        self.fix = " ".join(fix.split()).rstrip(". ")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")


class RecordError(FSTError):
    """The attack record (or a defense result / checkpoint) cannot be used."""


class ConfigError(FSTError):
    """A yaml or command-line value is missing, unknown, of the wrong type or out of range."""


class DataError(FSTError):
    """The clean dataset or the poisoned images cannot be read."""


class ModelError(FSTError):
    """The model cannot be built, loaded or tuned (unknown name, no head, bad state_dict)."""


class InstallError(FSTError):
    """The installer cannot write into (or remove from) the BackdoorBench checkout."""


class TrainingDiverged(FSTError):
    """The loss became NaN or infinite during tuning."""
