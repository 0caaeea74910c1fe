"""The plan of an ablation: one :class:`Job` (an ordinary ``training.run`` run) per (budget, rule, setting, seed),
with the config it runs."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Sequence, Union

from .settings import BUDGETS, COMMON, SETTINGS, Preset

__all__ = ["Job", "FIRST_SEED", "seeds_of", "plan", "job_config"]

FIRST_SEED = 1993


@dataclass(frozen=True)
class Job:
    """One run of the ablation (``budget`` None: a bound without memory, shared by every budget)."""

    preset: str
    budget: Union[str, None]
    setting: str
    seed: int
    overrides: tuple
    run_dir: str
    base_config: str = "synthetic"
    rule: Union[str, None] = None  # the class-weight rule, where the preset compares rules and it matters
    learner: str = "foster"  # the learner of the memory settings (the bounds are learners of their own)

    @property
    def key(self) -> str:
        rule = f"-{self.rule}" if self.rule else ""
        return f"{self.budget or 'bound'}{rule}-{self.setting}-seed{self.seed}"


def seeds_of(count: int) -> list[int]:
    return [FIRST_SEED + k for k in range(count)]


def plan(preset: Preset, *, runs_dir: str, seeds: int, settings: Union[Sequence[str], None] = None,
         budgets: Sequence[str] = BUDGETS, device: str = "cpu", extra: Sequence[str] = (),
         learner: str = "foster") -> list[Job]:
    """Every run of the ablation, in report order (``settings`` default: the preset's); the bounds run once per
    seed, at no memory; a setting the class-weight rule can change runs under each of the preset's ``rules``; the
    memory settings run with ``learner``."""
    jobs = []
    for name in preset.settings if settings is None else settings:
        setting = SETTINGS[name]
        for budget in budgets if setting.memory else (None,):
            for rule in preset.rules if preset.rules and setting.ruled else (None,):
                for seed in seeds_of(seeds):
                    memory = f"memory_size={preset.memory_size(budget) if budget else 0}"
                    ruling = (f"class_weight_counts={rule}",) if rule else ()
                    learning = (f"learner={learner}",) if learner != "foster" and setting.memory else ()
                    overrides = (*preset.overrides, *COMMON, memory, *ruling, *learning, *setting.overrides,
                                 f"seed={seed}", f"device={device}", *extra)
                    job = Job(preset.name, budget, name, seed, overrides, "", preset.base_config, rule,
                              learner if setting.memory else name)
                    jobs.append(dataclasses.replace(job, run_dir=os.path.join(runs_dir, job.key)))
    return sorted(jobs, key=lambda j: (j.budget is None, BUDGETS.index(j.budget) if j.budget else 0))


def job_config(job: Job):
    """The validated :class:`~training.config.Config` of a job (a fresh copy)."""
    return copy.deepcopy(_load_config(job.base_config, job.overrides))


@functools.lru_cache(maxsize=256)
def _load_config(base: str, overrides: tuple):
    from ...config import load_config

    return load_config(base, list(overrides))
