"""CIM ablation: compressed vs uncompressed exemplars at equal memory, on the embedded synthetic data or on real
photos (Tiny ImageNet).

    python -m training.experiments.ablation [--quick | --gpu | --preset NAME] [--data-root DIR] [--seeds N]
                                            [--out DIR] [--runs DIR] [--device cpu|cuda|auto] [--jobs N]
                                            [--threads N] [--settings a,b] [--budgets small,large]
                                            [--set key=value ...] [--report-only] [--dry-run]

Every (budget, setting, seed) is one ordinary ``training.run`` run (the preset's bundled config, ``synthetic`` or
``tinyimagenet``, plus the preset's and the setting's ``--set`` overrides) in its own run directory under ``--runs``.
Settings, all at the same memory budget in image units (``memory_size``, shared by the seen classes as in the
original protocol):

``none``        plain FOSTER, uncompressed exemplars (cost 1 each);
``downsample``  every exemplar downsampled as a whole (no box), cost 1 / ratio;
``cam``         CAM boxes with the fixed threshold 0.6, box kept at full resolution, the rest downsampled;
``otsu``        the same with a per-image Otsu threshold;
``cim``         the full method: boxes from the rational-branch CAM learnt by the bilevel meta-step (threshold 0.6).

and the two usual bounds, which keep no memory and so run once per seed for all budgets:

``joint``       one network trained on every seen class's images each phase (upper bound);
``finetune``    one network fine-tuned on the new classes' images only (lower bound).

Runs are resumable: a run directory whose ``summary.json`` says ``finished`` is reused (after checking that its
config is the one this command would run), one with a checkpoint is continued with ``--resume``, anything else
starts over. Results go to ``--out`` (default ``results``): ``ablation.json`` (every number), ``ablation.md`` (tables,
the measured gaps, the original paper's figures beside ours) and ``ablation.png``; presets other than ``default``
write ``ablation-<preset>.*``. See docs/ablation.md.
"""
from .cli import build_parser, main
from .plan import FIRST_SEED, Job, job_config, plan, seeds_of
from .render import output_paths, plot_results, render_markdown, write_outputs
from .report import aggregate, build_report, collect, conditions
from .runner import TIMING_NAME, job_state, run_jobs
from .settings import (BUDGETS, COMMON, COMPRESSION_SETTINGS, GAPS, LEARNERS, ORIGINAL, PRESETS, RULES, SETTINGS,
                       Preset, Setting)

__all__ = [
    "SETTINGS", "COMPRESSION_SETTINGS", "PRESETS", "BUDGETS", "RULES", "LEARNERS", "GAPS", "ORIGINAL", "COMMON",
    "FIRST_SEED", "TIMING_NAME", "Setting", "Preset", "Job", "plan", "seeds_of", "job_config", "job_state",
    "run_jobs", "collect", "aggregate", "conditions", "build_report", "write_outputs", "output_paths",
    "render_markdown", "plot_results", "build_parser", "main",
]
