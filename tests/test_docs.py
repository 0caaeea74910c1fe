"""Figures and lists the docs state that the code or the results hold too, so that they cannot drift apart."""
import json
import os
import re

import pytest

from training.run import RESUMABLE_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as handle:
        return handle.read()


def test_the_resume_option_lists_the_resumable_keys():
    rows = [line for line in _read("docs/training.md").splitlines() if line.startswith("| `--resume` |")]
    assert len(rows) == 1, "docs/training.md: expected one row of the options table for --resume"
    changeable = re.search(r"only (.*) may change", rows[0])
    assert changeable, "docs/training.md: the --resume row no longer says 'only ... may change'"
    listed = re.findall(r"`([a-z_]+)`", changeable.group(1))
    assert sorted(listed) == sorted(RESUMABLE_KEYS) and len(set(listed)) == len(listed)


def _whole_image_iou():
    """The measured whole-image box IoU on Tiny ImageNet: each boxed run's mean over its phases (one value)."""
    report = json.loads(_read("results/ablation-tinyimagenet.json"))
    values = {round(run["box_iou_whole_image"], 2) for run in report["runs"] if run.get("box_iou_whole_image")}
    assert len(values) == 1, values  # the whole-image box does not depend on the setting or the seed
    return values.pop()


@pytest.mark.parametrize("path, pattern", [
    ("docs/data.md", r"about (0\.\d+) on Tiny ImageNet"),
    ("README.md", r"below\s+that of the whole image \((0\.\d+)\)"),
    ("docs/ablation.md", r"below the whole-image box's (0\.\d+)"),
])
def test_the_whole_image_box_iou_is_the_measured_one(path, pattern):
    found = re.findall(pattern, _read(path))
    assert found, f"{path}: the whole-image box IoU sentence ({pattern}) is gone"
    assert {float(value) for value in found} == {_whole_image_iou()}, path
