"""The exemplar store's checksums and training.memory_repair: damaged shards are named on read, and rebuilt from the
training images into exemplars equal to the originals."""
import os
import re

import pytest
import torch

from training.data.sources import TensorImageSet
from training.exemplar_store import ExemplarStore, ExemplarStoreError
from training.memory import ExemplarMemory, compress_exemplars
from training.memory_repair import damaged_classes, repair_memory

from test_memory import random_boxes, random_images

PER_CLASS = 6
LABELS = (3, 7, 12)


def _train_set(seed=5, size=(32, 32)):
    generator = torch.Generator().manual_seed(seed)
    images = random_images(generator, PER_CLASS * len(LABELS), size)
    boxes = random_boxes(generator, len(images), *size)
    targets = [label for label in LABELS for _ in range(PER_CLASS)]
    return TensorImageSet(torch.stack(images), targets), boxes


def _store(directory, codec="png"):
    return ExemplarStore(directory, codec=codec, quality=80)


def _memory(directory, train, boxes, mode="cam", codec="png"):
    memory = ExemplarMemory(ratio=4.0, mode=mode, store=_store(directory, codec))
    for n, label in enumerate(LABELS):
        indices = list(range(n * PER_CLASS, (n + 1) * PER_CLASS))
        memory.add_class(label, compress_exemplars([train.load(i) for i in indices], boxes[indices], 4.0, mode,
                                                   indices=indices, label=label))
    return memory


def _snapshot(memory):
    return {label: [(e.index, e.small.clone(), e.crop.clone(), e.box, e.cost) for e in memory.exemplars(label)]
            for label in memory.classes()}


def _assert_same(memory, snapshot):
    assert memory.classes() == list(snapshot)
    for label, expected in snapshot.items():
        got = memory.exemplars(label)
        assert len(got) == len(expected)
        for e, (index, small, crop, box, cost) in zip(got, expected):
            assert (e.index, e.box, e.cost) == (index, box, cost)
            assert torch.equal(e.small, small) and torch.equal(e.crop, crop)


def _shard_of(memory, label):
    return memory.store.path(memory._classes[label][0].refs[0].shard)


def _damage(memory):
    """Cut the first class's shard to a third, flip one byte in the middle of the second class's shard."""
    truncated, flipped = _shard_of(memory, LABELS[0]), _shard_of(memory, LABELS[1])
    with open(truncated, "rb") as handle:
        data = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(data[:len(data) // 3])
    with open(flipped, "rb") as handle:
        data = bytearray(handle.read())
    data[len(data) // 2] ^= 0x01
    with open(flipped, "wb") as handle:
        handle.write(bytes(data))
    return truncated, flipped


def _reloaded(memory, directory, codec="png"):
    """The memory as a resumed run has it: its state loaded into a fresh memory on a fresh store (no cache)."""
    fresh = ExemplarMemory(ratio=memory.ratio, mode=memory.mode, store=_store(directory, codec))
    fresh.load_state_dict(memory.state_dict())
    return fresh


def test_a_truncated_and_a_corrupt_shard_raise_a_named_error(tmp_path):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes)
    assert damaged_classes(memory) == {}
    truncated, flipped = _damage(memory)
    fresh = _reloaded(memory, tmp_path)
    with pytest.raises(ExemplarStoreError) as caught:
        fresh.images([LABELS[0]])
    message = str(caught.value)
    assert f"class {LABELS[0]}: shard {truncated} is truncated" in message and "--repair-memory" in message
    with pytest.raises(ExemplarStoreError, match=rf"class {LABELS[1]}: shard {flipped} is corrupt \(the \d+ bytes at "
                                                 r"offset \d+ have crc32 [0-9a-f]{8}, the index expects [0-9a-f]{8}\)"):
        fresh.images([LABELS[1]])
    assert isinstance(caught.value, ValueError)
    fresh.images([LABELS[2]])  # an intact class still reads
    problems = damaged_classes(fresh)
    assert sorted(problems) == sorted(LABELS[:2])
    assert problems[LABELS[0]].startswith(f"shard {truncated} is truncated")
    assert problems[LABELS[1]].startswith(f"shard {flipped} is corrupt")


def test_a_missing_shard_raises_the_named_error(tmp_path):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes)
    os.remove(_shard_of(memory, LABELS[2]))
    with pytest.raises(ExemplarStoreError, match=rf"class {LABELS[2]}: shard .* is missing"):
        _reloaded(memory, tmp_path).images()


@pytest.mark.parametrize("mode", ["cam", "downsample", "none"])
def test_repair_rebuilds_damaged_classes_bit_exact_in_png(tmp_path, mode):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes, mode=mode)
    snapshot, state = _snapshot(memory), memory.state_dict()
    _damage(memory)
    fresh = _reloaded(memory, tmp_path)
    assert repair_memory(fresh, train) == list(LABELS[:2])
    assert damaged_classes(fresh) == {}
    _assert_same(fresh, snapshot)
    _assert_same(_reloaded(fresh, tmp_path), snapshot)  # from the files on disk, not from a cache
    # PNG of the same pixels: the same bytes, so the same shards, offsets and checksums as before the damage
    repaired = fresh.state_dict()
    assert repaired["shards"] == state["shards"] and torch.equal(repaired["refs"], state["refs"])
    assert repair_memory(fresh, train) == []


def test_repair_of_a_trimmed_class_writes_a_new_shard(tmp_path):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes, mode="downsample")  # cost 1/4 each: trim to 1.0 keeps 4 of 6
    memory.trim(LABELS[0], 1.0)
    snapshot = _snapshot(memory)
    assert len(snapshot[LABELS[0]]) == 4
    old_shard = _shard_of(memory, LABELS[0])
    _damage(memory)
    fresh = _reloaded(memory, tmp_path)
    assert repair_memory(fresh, train) == list(LABELS[:2])
    assert _shard_of(fresh, LABELS[0]) != old_shard and os.path.isfile(_shard_of(fresh, LABELS[0]))
    _assert_same(_reloaded(fresh, tmp_path), snapshot)


def test_repair_with_a_lossy_codec_gives_the_original_parts(tmp_path):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes, codec="jpeg")
    snapshot = _snapshot(memory)
    _damage(memory)
    fresh = _reloaded(memory, tmp_path, codec="jpeg")
    assert repair_memory(fresh, train) == list(LABELS[:2])
    _assert_same(_reloaded(fresh, tmp_path, codec="jpeg"), snapshot)


def test_repair_refuses_images_that_are_not_the_run_s(tmp_path):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes)
    _damage(memory)
    other, _ = _train_set(seed=6)  # same sizes, other pixels: the parts before the cut do not match
    with pytest.raises(ExemplarStoreError, match=rf"cannot repair class {LABELS[0]}: training image 0 does not give "
                                                 "back its intact stored exemplar"):
        repair_memory(_reloaded(memory, tmp_path), other)
    smaller, _ = _train_set(size=(24, 24))
    with pytest.raises(ExemplarStoreError, match=rf"cannot repair class {LABELS[0]}: .* was made from a \(3, 32, 32\) "
                                                 r"image, the data root has \(3, 24, 24\)"):
        repair_memory(_reloaded(memory, tmp_path), smaller)
    fewer = TensorImageSet(train.images[:3], train.targets[:3])
    with pytest.raises(ExemplarStoreError, match="outside the 3 training images"):
        repair_memory(_reloaded(memory, tmp_path), fewer)


def test_states_from_before_the_checksums_load_and_are_checked_for_length(tmp_path):
    train, boxes = _train_set()
    memory = _memory(tmp_path, train, boxes)
    snapshot, state = _snapshot(memory), memory.state_dict()
    assert state["refs"].shape[1] == 8 and bool((state["refs"][:, 3] >= 0).all())
    old = dict(state, refs=state["refs"].view(-1, 2, 4)[:, :, :3].reshape(-1, 6))  # shard, offset, length per part
    fresh = ExemplarMemory(ratio=4.0, mode="cam", store=_store(tmp_path))
    fresh.load_state_dict(old)
    assert all(ref.crc32 is None for _, r in fresh._records() for ref in r.refs if ref is not None)
    _assert_same(fresh, snapshot)
    assert (fresh.state_dict()["refs"][:, [3, 7]] == -1).all()  # saved again: no checksum rather than a made-up one
    _damage(memory)
    fresh = ExemplarMemory(ratio=4.0, mode="cam", store=_store(tmp_path))
    fresh.load_state_dict(old)
    assert sorted(damaged_classes(fresh)) == sorted(LABELS[:2])  # the flipped byte breaks the PNG's own decoding
    assert repair_memory(fresh, train) == list(LABELS[:2])
    _assert_same(fresh, snapshot)


def test_a_resume_on_a_damaged_store_stops_with_one_line(tmp_path, monkeypatch, capsys):
    from test_run import TINY
    from training.run import build_parser, main

    out = str(tmp_path / "run")
    sets = [item for s in TINY + ["compression=cam", "threshold=otsu"] for item in ("--set", s)]
    monkeypatch.setenv("CIM_TRAINING_STOP_AFTER_CHECKPOINTS", "2")  # killed in phase 1, after phase 0's memory
    with pytest.raises(SystemExit):
        main(["--out", out] + sets)
    monkeypatch.delenv("CIM_TRAINING_STOP_AFTER_CHECKPOINTS")
    for name in os.listdir(os.path.join(out, "memory")):
        path = os.path.join(out, "memory", name)
        with open(path, "rb") as handle:
            data = bytearray(handle.read())
        data[len(data) // 2] ^= 0x01
        with open(path, "wb") as handle:
            handle.write(bytes(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", out, "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert re.fullmatch(r"error: exemplar store: class \d+: shard .*\.bin is corrupt \(.*\); rebuild it from the "
                        r"training images with .*--repair-memory.*", err), err
    assert build_parser().parse_args(["--resume", "--repair-memory"]).repair_memory
    repaired = main(["--out", out, "--resume", "--repair-memory"])  # what the message says to do
    assert "damaged class(es) rebuilt from the training images" in capsys.readouterr().out
    whole = main(["--out", str(tmp_path / "whole")] + sets)
    assert [p["top1"] for p in repaired["per_phase"]] == [p["top1"] for p in whole["per_phase"]]
