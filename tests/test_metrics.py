"""Metrics with hand-made predictions (known accuracies and forgetting) and the files the loggers write."""
import io
import json
import os

import pytest
import torch

from training.metrics import (
    ConsoleTable,
    JsonlLog,
    MetricsHistory,
    PhaseMetrics,
    RunLoggers,
    evaluate,
    plot_accuracy,
    write_summary,
)

TASKS = [[0, 1], [2, 3], [4, 5]]


def predictions(targets, correct, num_classes, *, top5_rescued=()):
    """Ranked predictions [N, 5]: row n predicts its target first iff correct[n]; a wrong row n in top5_rescued
    has the target at rank 3, any other wrong row never predicts it."""
    rows = []
    for n, (target, ok) in enumerate(zip(targets, correct)):
        others = [c for c in range(num_classes + 5) if c != target]
        if ok:
            rows.append([target] + others[:4])
        elif n in top5_rescued:
            rows.append(others[:2] + [target] + others[2:4])
        else:
            rows.append(others[:5])
    return torch.tensor(rows)


def phase_outputs(phase):
    """Per-task top-1 accuracies: phase 0: [75]; phase 1: [50, 100]; phase 2: [25, 50, 100] (4 test images per
    task)."""
    accuracy = {0: [3], 1: [2, 4], 2: [1, 2, 4]}[phase]
    targets, correct = [], []
    for task, hits in enumerate(accuracy):
        labels = [TASKS[task][0], TASKS[task][0], TASKS[task][1], TASKS[task][1]]
        targets += labels
        correct += [True] * hits + [False] * (4 - hits)
    return torch.tensor(targets), correct


@pytest.fixture
def history():
    record = MetricsHistory()
    for phase in range(3):
        targets, correct = phase_outputs(phase)
        record.add(evaluate(predictions(targets.tolist(), correct, 2 * (phase + 1)), targets, TASKS[:phase + 1]))
    return record


def test_evaluate_known_accuracies():
    targets, correct = phase_outputs(2)
    rescued = [n for n, ok in enumerate(correct) if not ok][:3]
    metrics = evaluate(predictions(targets.tolist(), correct, 6, top5_rescued=rescued), targets, TASKS)
    assert metrics.phase == 2 and metrics.num_classes == 6 and metrics.num_samples == 12
    assert metrics.top1 == pytest.approx(100 * 7 / 12)
    assert metrics.top5 == pytest.approx(100 * 10 / 12)
    assert metrics.per_task == pytest.approx([25.0, 50.0, 100.0])
    assert metrics.old == pytest.approx(100 * 3 / 8) and metrics.new == 100.0


def test_evaluate_logits_and_top1_only():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.5, 0.0], [0.0, 0.2, 0.1]])
    targets = torch.tensor([0, 1, 2, 1])
    metrics = evaluate(logits, targets, [[0, 1, 2]])
    # top-1 hits: rows 0 and 3; with 3 classes, "top-5" is top-3: all rows.
    assert metrics.top1 == 50.0 and metrics.top5 == 100.0 and metrics.old is None and metrics.new == 50.0
    metrics = evaluate(logits, targets, [[0, 1, 2]], topk=2)
    assert metrics.top5 == 75.0  # top-2 misses only row 2 (its class ranks last)
    metrics = evaluate(torch.tensor([0, 0, 2, 1]), targets, [[0], [1, 2]])
    assert metrics.top1 == 75.0 and metrics.top5 is None and metrics.old == 100.0 and metrics.new == 200 / 3
    assert metrics.per_task == pytest.approx([100.0, 200 / 3])


def test_evaluate_task_without_samples_reads_none():
    metrics = evaluate(torch.tensor([[0], [0]]), torch.tensor([0, 1]), [[0, 1], [2, 3]])
    assert metrics.new is None and metrics.per_task == [50.0, None] and metrics.old == 50.0


def test_history_average_incremental_accuracy_and_forgetting(history):
    top1 = [75.0, 75.0, 100 * 7 / 12]
    assert [m.top1 for m in history.phases] == pytest.approx(top1)
    assert history.last.avg_incremental_top1 == pytest.approx(sum(top1) / 3)
    assert history.phases[0].forgetting is None
    assert history.phases[1].forgetting == pytest.approx(25.0)  # task 0: 75 -> 50
    # task 0: max(75, 50) - 25 = 50; task 1: 100 - 50 = 50
    assert history.last.forgetting == pytest.approx(50.0)
    assert history.accuracy_matrix() == [[75.0], [50.0, 100.0], [25.0, 50.0, 100.0]]


def test_forgetting_uses_the_best_previous_accuracy():
    record = MetricsHistory()
    for phase, per_task in enumerate([[40.0], [90.0, 50.0], [60.0, 80.0, 70.0]]):
        record.add(PhaseMetrics(phase=phase, num_classes=2 * phase + 2, num_samples=1, top1=0.0, top5=0.0,
                                old=None, new=0.0, per_task=per_task))
    # task 0: max(40, 90) - 60 = 30; task 1: 50 - 80 = -30 (backward transfer counts as negative forgetting)
    assert record.forgetting() == pytest.approx(0.0)
    assert record.forgetting(1) == pytest.approx(-50.0)


def test_history_re_add_replaces_and_state_dict_round_trip(history):
    state = json.loads(json.dumps(history.state_dict()))
    restored = MetricsHistory()
    restored.load_state_dict(state)
    assert restored.summary() == history.summary()
    # Re-running phase 1 after a resume replaces it and drops phase 2.
    targets, correct = phase_outputs(1)
    restored.add(evaluate(predictions(targets.tolist(), [True] * 8, 4), targets, TASKS[:2]))
    assert len(restored) == 2 and restored.last.top1 == 100.0 and restored.last.forgetting == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="phase 4"):
        restored.add(PhaseMetrics(phase=4, num_classes=1, num_samples=0, top1=None, top5=None, old=None,
                                  new=None, per_task=[]))


def test_console_table(history):
    stream = io.StringIO()
    ConsoleTable(stream=stream).log(history)
    lines = stream.getvalue().splitlines()
    assert lines[0].split()[:8] == ["phase", "classes", "top1", "top5", "old", "new", "avg_inc", "forget"]
    assert len(lines) == 2 + 3
    assert lines[2].split()[:6] == ["0", "2", "75.00", "75.00", "-", "75.00"]
    assert lines[4].split()[-3:] == ["25.0", "50.0", "100.0"]
    silent = io.StringIO()
    ConsoleTable(stream=silent, enabled=False).log(history)
    assert silent.getvalue() == ""


def test_run_loggers_write_parseable_files(tmp_path, history):
    run_dir = tmp_path / "run"
    stream = io.StringIO()
    loggers = RunLoggers(str(run_dir), stream=stream)
    partial = MetricsHistory()
    for metrics in history.phases:
        partial.add(metrics)
        loggers.log_phase(partial, extra={"memory": {"bytes": 123}})
        loggers.log_scalars({"loss/train": 0.5, "not_a_number": "x"}, step=metrics.phase)
    loggers.finish(history, extra={"bad_images": 0})

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["phase"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[2])["forgetting"] == pytest.approx(50.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["phases_done"] == 3 and summary["bad_images"] == 0
    assert summary["final"]["top1"] == pytest.approx(100 * 7 / 12)
    assert summary["average_incremental_accuracy"]["top1"] == pytest.approx(history.last.avg_incremental_top1)
    assert len(summary["per_phase"]) == 3 and summary["accuracy_matrix"][1] == [50.0, 100.0]
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "75.00" in stream.getvalue()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"accuracy/top1", "accuracy/old", "forgetting", "task_accuracy/task_2", "loss/train"} <= set(tags)
    assert [e.step for e in events.Scalars("accuracy/top1")] == [0, 1, 2]
    assert events.Scalars("accuracy/top1")[0].value == pytest.approx(75.0)
    assert [e.step for e in events.Scalars("forgetting")] == [1, 2]  # None in phase 0 is not written


def test_disabled_loggers_write_nothing(tmp_path, history):
    run_dir = tmp_path / "rank1"
    stream = io.StringIO()
    loggers = RunLoggers(str(run_dir), enabled=False, stream=stream)
    loggers.log_phase(history)
    loggers.log_scalars({"loss": 1.0}, 0)
    loggers.finish(history)
    assert not run_dir.exists() and stream.getvalue() == ""
    write_summary(str(tmp_path / "s.json"), history, enabled=False)
    JsonlLog(str(tmp_path / "m.jsonl"), enabled=False).write(history)
    assert os.listdir(tmp_path) == []


def test_jsonl_rewrite_never_duplicates_phases(tmp_path, history):
    path = str(tmp_path / "metrics.jsonl")
    log = JsonlLog(path)
    log.write(history)
    resumed = MetricsHistory()
    resumed.load_state_dict(history.state_dict())
    targets, correct = phase_outputs(2)
    resumed.add(evaluate(predictions(targets.tolist(), correct, 6), targets, TASKS))  # phase 2 re-run
    log.write(resumed)
    assert [json.loads(line)["phase"] for line in open(path)] == [0, 1, 2]


def test_plot_with_missing_values(tmp_path):
    record = MetricsHistory()
    record.add(PhaseMetrics(phase=0, num_classes=10, num_samples=5, top1=50.0, top5=None, old=None, new=50.0,
                            per_task=[50.0]))
    path = plot_accuracy(record, str(tmp_path / "plots" / "acc.png"))
    with open(path, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
