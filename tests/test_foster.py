"""training.learners.foster: the class counts behind FOSTER's class-balance weights (nominal, as the original, or real)."""
from types import SimpleNamespace

import pytest

from training.config import load_config
from training.learners.foster import Foster, class_balance_weights


def _learner(overrides):
    targets = [7] * 10 + [8] * 12 + [5] * 3
    stream = SimpleNamespace(order=[5, 6, 4, 7, 8], train_count=targets.count)
    memory = SimpleNamespace(counts=lambda: {5: 9, 6: 8, 4: 7})
    return SimpleNamespace(cfg=load_config("synthetic", overrides), memory=memory, stream=stream)


@pytest.mark.parametrize("overrides, old", [
    (["memory_size=20", "class_weight_counts=nominal"], [6, 6, 6]),  # the original: memory_size // known classes
    (["memory_per_class=5", "fixed_memory=true", "class_weight_counts=nominal"], [5, 5, 5]),
    (["memory_size=20", "class_weight_counts=real"], [9, 8, 7]),  # stored exemplars
])
def test_class_counts(overrides, old):
    phase = SimpleNamespace(known=3, classes=[7, 8])
    assert Foster._class_counts(_learner(overrides), phase) == old + [10, 12]


def test_real_counts_weaken_the_rebalancing():
    """The figures of docs/training.md: last ImageNet-100 phase (90 old classes, 2000 // 90 = 22 exemplars each,
    1300 images per new class), beta 0.97; at a mean exemplar cost of 0.55 an old class holds 40 exemplars."""
    def ratio(old_count):
        weights = class_balance_weights([old_count] * 90 + [1300] * 10, 0.97)
        return float(weights[0] / weights[-1])

    assert ratio(22) == pytest.approx(2.05, abs=0.01)
    assert ratio(40) == pytest.approx(1.42, abs=0.01)
