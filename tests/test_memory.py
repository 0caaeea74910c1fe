"""Exemplar memory: herding, budget, trimming, compressed storage, rebuild, bytes, checkpoints."""
import io
import math

import numpy as np
import pytest
import torch

import cim_ext
from training.memory import (
    Exemplar,
    ExemplarMemory,
    class_budget,
    compress_exemplars,
    exemplar_costs,
    herding_select,
)


def brute_force_herding(features, costs, budget):
    """iCaRL herding written out step by step as in the original code (np.delete of picked rows, argmin of the
    distance between the class mean and the candidate running means), with the original stop rule."""
    vectors = features.numpy().astype(np.float64)
    vectors = (vectors.T / (np.linalg.norm(vectors.T, axis=0) + 1e-8)).T
    class_mean = np.mean(vectors, axis=0)
    positions = np.arange(len(vectors))
    costs = np.asarray(costs, dtype=np.float64)
    selected, picked_vectors, consumption = [], [], 0.0
    next_candidate = None
    for k in range(1, len(features) + 1):
        S = np.sum(picked_vectors, axis=0) if picked_vectors else np.zeros_like(class_mean)
        distances = [math.sqrt(float(np.sum((class_mean - (S + v) / k) ** 2))) for v in vectors]
        i = int(np.argmin(distances))
        if consumption + costs[i] > budget + 1e-9:
            next_candidate = int(positions[i])
            break
        consumption += costs[i]
        selected.append(int(positions[i]))
        picked_vectors.append(vectors[i])
        vectors = np.delete(vectors, i, axis=0)
        positions = np.delete(positions, i)
        costs = np.delete(costs, i)
    return selected, next_candidate


def random_images(generator, count, size):
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator) for _ in range(count)]


def random_boxes(generator, count, height, width):
    """Random boxes, with the empty and the full box included."""
    rows = []
    for n in range(count):
        if n % 7 == 0:
            rows.append([0, 0, 0, 0])
        elif n % 7 == 1:
            rows.append([0, height, 0, width])
        else:
            y = torch.randint(0, height + 1, (2,), generator=generator).sort().values.tolist()
            x = torch.randint(0, width + 1, (2,), generator=generator).sort().values.tolist()
            rows.append([y[0], y[1], x[0], x[1]])
    return torch.tensor(rows, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ herding
@pytest.mark.parametrize("seed", range(6))
def test_herding_order_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    count, dim = 40, 6
    features = torch.randn(count, dim, generator=generator) * torch.rand(count, 1, generator=generator) * 3
    costs = 0.25 + 0.75 * torch.rand(count, generator=generator, dtype=torch.float64)
    budget = float(torch.randint(0, 15, (1,), generator=generator))
    expected, _ = brute_force_herding(features, costs, budget)
    assert herding_select(features, costs, budget) == expected


def test_herding_unit_costs_is_plain_icarl():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(30, 5, generator=generator)
    expected, _ = brute_force_herding(features, np.ones(30), 10)
    chosen = herding_select(features, torch.ones(30), 10)
    assert chosen == expected and len(chosen) == 10 and len(set(chosen)) == 10


@pytest.mark.parametrize("seed", range(8))
def test_herding_spends_exactly_the_budget(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    count = 50
    features = torch.randn(count, 8, generator=generator)
    costs = exemplar_costs(random_boxes(generator, count, 32, 32), (32, 32), 4.0, "cam")
    budget = float(torch.randint(1, 12, (1,), generator=generator))
    chosen = herding_select(features, costs, budget)
    spent = float(costs[chosen].sum())
    assert spent <= budget + 1e-9
    _, next_candidate = brute_force_herding(features, costs, budget)
    if len(chosen) < count:
        # The next exemplar herding would add does not fit: the budget is spent as far as the costs allow.
        assert next_candidate is not None and next_candidate not in chosen
        assert spent + float(costs[next_candidate]) > budget
    assert len(set(chosen)) == len(chosen)


def test_herding_stops_when_candidates_run_out_and_on_zero_budget():
    features = torch.randn(5, 3)
    assert sorted(herding_select(features, torch.full((5,), 0.1), 100.0)) == list(range(5))
    assert herding_select(features, torch.ones(5), 0.0) == []
    assert herding_select(features, torch.ones(5), 0.999) == []
    assert herding_select(torch.zeros(0, 3), torch.zeros(0), 3.0) == []


def test_herding_rejects_bad_input():
    with pytest.raises(ValueError, match="costs"):
        herding_select(torch.randn(4, 2), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="costs"):
        herding_select(torch.randn(2, 2), torch.tensor([1.0, 0.0]), 1.0)
    with pytest.raises(ValueError, match="budget"):
        herding_select(torch.randn(2, 2), torch.ones(2), -1.0)


# ------------------------------------------------------------------------------------------------ budget
def test_class_budget():
    assert class_budget(memory_size=2000, memory_per_class=20, fixed_memory=False, total_classes=30) == 66.0
    assert class_budget(memory_size=2000, memory_per_class=20, fixed_memory=True, total_classes=30) == 20.0

    class Config:
        memory_size, memory_per_class, fixed_memory = 2000, 20, False

    assert class_budget(Config(), total_classes=100) == 20.0
    assert class_budget(Config(), total_classes=100, fixed_memory=True, memory_per_class=7) == 7.0
    with pytest.raises(ValueError, match="total_classes"):
        class_budget(Config(), total_classes=0)
    with pytest.raises(ValueError, match="memory_size"):
        class_budget(total_classes=3, memory_per_class=2, fixed_memory=False)


# ------------------------------------------------------------------------------------------------ costs
def test_costs_by_mode():
    boxes = torch.tensor([[0, 16, 0, 16], [0, 0, 0, 0]])
    assert exemplar_costs(boxes, (32, 32), 4.0, "none").tolist() == [1.0, 1.0]
    assert exemplar_costs(None, [(32, 32), (30, 31)], 4.0, "downsample").tolist() == [0.25, 0.25]
    # Aligned box: exactly the original compress_cost = A + (1 - A) / ratio.
    assert exemplar_costs(boxes, (32, 32), 4.0, "cam").tolist() == pytest.approx([0.25 + 0.75 / 4, 0.25])
    # A box cutting cells is charged its real stored fraction when larger.
    cut = torch.tensor([[1, 4, 1, 4]])
    nominal = float(cim_ext.compress_cost(cut, (32, 32), 4.0)[0])
    charged = float(exemplar_costs(cut, (32, 32), 4.0, "cam")[0])
    assert charged == pytest.approx((256 - 1 + 9) / 1024) and charged > nominal
    # Images smaller than sqrt(ratio) per side keep at least one small pixel: charged at its real size.
    assert exemplar_costs(None, [(1, 1)], 16.0, "downsample").tolist() == [1.0]


def test_costs_never_below_compress_cost():
    generator = torch.Generator().manual_seed(3)
    for height, width, ratio in [(32, 32, 4.0), (37, 23, 2.5), (224, 224, 4.0), (5, 9, 16.0)]:
        boxes = random_boxes(generator, 30, height, width)
        nominal = cim_ext.compress_cost(boxes, (height, width), ratio)
        charged = exemplar_costs(boxes, (height, width), ratio, "cam")
        assert bool((charged >= nominal).all())
        # The boundary term is small for realistic sizes.
        if height >= 32:
            assert float((charged - nominal).max()) < 0.05


def test_mode_none_and_downsample_storage():
    generator = torch.Generator().manual_seed(4)
    images = random_images(generator, 5, (16, 20))
    none = compress_exemplars(images, None, 4.0, "none")
    assert all(torch.equal(e.small, image) and e.crop.numel() == 0 and e.box == (0, 0, 0, 0) and e.cost == 1.0
               for e, image in zip(none, images))
    memory = ExemplarMemory(ratio=4.0, mode="none")
    memory.add_class(0, none)
    assert memory.bytes_held() == 5 * 3 * 16 * 20 and memory.total_cost() == 5.0 == memory.compress_cost()
    assert all(torch.equal(a, b) for a, b in zip(memory.images(), images))

    down = compress_exemplars(images, None, 4.0, "downsample")
    assert all(e.small.shape == (3, 8, 10) and e.crop.numel() == 0 and e.cost == 0.25 for e in down)
    memory = ExemplarMemory(ratio=4.0, mode="downsample")
    memory.add_class(0, down)
    assert memory.bytes_held() == 5 * 3 * 8 * 10 and memory.total_cost() == 1.25
    empty = torch.zeros(5, 4, dtype=torch.int64)
    assert torch.equal(torch.stack(memory.images()), cim_ext.compress(torch.stack(images), empty, 4.0))


# ------------------------------------------------------------------------------------------------ storage
@pytest.mark.parametrize("size,ratio", [((32, 32), 4.0), ((37, 23), 2.5), ((9, 13), 16.0), ((1, 1), 4.0),
                                        ((24, 24), 1.0), ((64, 48), 3.0)])
def test_rebuild_is_bit_exact_compress(size, ratio):
    generator = torch.Generator().manual_seed(hash(size) % 1000)
    images = random_images(generator, 14, size)
    boxes = random_boxes(generator, 14, *size)
    memory = ExemplarMemory(ratio=ratio, mode="cam")
    memory.add_class(5, compress_exemplars(images, boxes, ratio, "cam", indices=range(100, 114)))
    expected = cim_ext.compress(torch.stack(images), boxes, ratio)
    assert torch.equal(torch.stack(memory.images()), expected)
    dataset = memory.dataset()
    assert all(torch.equal(dataset[n][0], expected[n]) for n in range(14))
    assert memory.indices() == list(range(100, 114)) and memory.targets() == [5] * 14


def test_rebuild_mixed_sizes_and_classes():
    generator = torch.Generator().manual_seed(5)
    sizes = [(32, 32), (20, 28), (32, 32), (17, 40), (20, 28)]
    images = [torch.randint(0, 256, (3, *s), dtype=torch.uint8, generator=generator) for s in sizes]
    boxes = torch.cat([random_boxes(generator, 3, *s)[2:3] for s in sizes])
    memory = ExemplarMemory(ratio=4.0, mode="cam")
    memory.add_class(1, compress_exemplars(images[:2], boxes[:2], 4.0, "cam"))
    memory.add_class(0, compress_exemplars(images[2:], boxes[2:], 4.0, "cam"))
    assert memory.classes() == [1, 0] and memory.counts() == {1: 2, 0: 3}
    rebuilt = memory.images()
    for image, box, out in zip(images, boxes, rebuilt):
        assert torch.equal(out, cim_ext.compress(image[None], box[None], 4.0)[0])
    assert [t.shape[1:] for t in memory.images(labels=[0])] == [torch.Size(s) for s in sizes[2:]]


def test_unstored_small_pixels_are_exactly_the_unused_ones():
    """A small pixel is dropped iff no rebuilt pixel outside the box reads it (checked with uncompress)."""
    generator = torch.Generator().manual_seed(6)
    for size, ratio in [((32, 32), 4.0), ((37, 23), 2.5), ((50, 50), 7.0)]:
        boxes = random_boxes(generator, 20, *size)
        small_h, small_w = cim_ext.down_size(*size, ratio)
        index = torch.arange(small_h * small_w, dtype=torch.float32).view(1, 1, small_h, small_w).expand(20, 1, -1, -1)
        crops = torch.cat([torch.full(((b[1] - b[0]) * (b[3] - b[2]),), -1.0) for b in boxes.tolist()])
        up = cim_ext.uncompress(index.contiguous(), crops, boxes, size)
        images = random_images(generator, 20, size)
        memory = ExemplarMemory(ratio=ratio, mode="cam")
        memory.add_class(0, compress_exemplars(images, boxes, ratio, "cam"))
        for record, used_map in zip(memory._classes[0], up):
            used = torch.zeros(small_h * small_w, dtype=torch.bool)
            values = used_map[used_map >= 0].long()
            used[values] = True
            assert record.kept.numel() == 3 * int(used.sum())


# ------------------------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize("seed", range(5))
def test_bytes_stay_within_budget(seed):
    generator = torch.Generator().manual_seed(200 + seed)
    height, width, ratio = 32, 32, 4.0
    count = 60
    images = random_images(generator, count, (height, width))
    boxes = random_boxes(generator, count, height, width)
    features = torch.randn(count, 16, generator=generator)
    memory = ExemplarMemory(ratio=ratio, mode="cam")
    budget = class_budget(memory_size=40, memory_per_class=0, fixed_memory=False, total_classes=2 + seed)
    costs = exemplar_costs(boxes, (height, width), ratio, "cam")
    chosen = herding_select(features, costs, budget)
    memory.add_class(0, compress_exemplars([images[i] for i in chosen], boxes[chosen], ratio, "cam", indices=chosen))
    assert memory.total_cost(0) <= budget + 1e-9
    for record in memory._classes[0]:
        assert record.nbytes <= record.cost * 3 * height * width + 1e-6
    assert memory.bytes_held(0) <= memory.cost_bytes(0) <= memory.budget_bytes(budget, (height, width))
    # With the original compress_cost accounting alone the bytes can exceed the budget by the boundary cells:
    assert memory.compress_cost(0) <= memory.total_cost(0)
    # Trimming keeps the invariant for the smaller budget.
    smaller = budget / 2
    memory.trim(0, smaller)
    assert memory.bytes_held(0) <= memory.budget_bytes(smaller, height)


def test_bytes_within_budget_with_per_image_sizes():
    generator = torch.Generator().manual_seed(9)
    sizes = [tuple(int(v) for v in torch.randint(20, 60, (2,), generator=generator)) for _ in range(40)]
    images = [torch.randint(0, 256, (3, *s), dtype=torch.uint8, generator=generator) for s in sizes]
    boxes = torch.cat([random_boxes(generator, 3, *s)[2:3] for s in sizes])
    budget = 6.0
    costs = exemplar_costs(boxes, sizes, 3.0, "cam")
    chosen = herding_select(torch.randn(40, 4, generator=generator), costs, budget)
    memory = ExemplarMemory(ratio=3.0, mode="cam")
    memory.add_class(2, compress_exemplars([images[i] for i in chosen], boxes[chosen], 3.0, "cam"))
    largest = max(s[0] * s[1] for s in sizes)
    assert memory.bytes_held() <= memory.cost_bytes() <= budget * 3 * largest
    for record in memory._classes[2]:
        assert record.nbytes <= record.cost * 3 * record.size[0] * record.size[1] + 1e-6


# ------------------------------------------------------------------------------------------------ trimming
def test_trim_keeps_the_stored_prefix_that_fits():
    generator = torch.Generator().manual_seed(7)
    images = random_images(generator, 6, (16, 16))
    boxes = torch.tensor([[0, 16, 0, 16], [0, 0, 0, 0], [0, 8, 0, 8], [0, 16, 0, 16], [0, 0, 0, 0], [0, 0, 0, 0]])
    exemplars = compress_exemplars(images, boxes, 4.0, "cam", indices=[10, 11, 12, 13, 14, 15])
    assert [e.cost for e in exemplars] == [1.0, 0.25, 0.25 + 0.75 / 4, 1.0, 0.25, 0.25]
    memory = ExemplarMemory(ratio=4.0, mode="cam")
    memory.add_class(3, exemplars)
    assert memory.trim(3, 10.0) == 0 and memory.counts() == {3: 6}
    # 1 + 0.25 + 0.4375 = 1.6875 <= 2.5; + 1.0 exceeds: stop there even though the later 0.25s would fit.
    assert memory.trim(3, 2.5) == 3
    assert [e.index for e in memory.exemplars(3)] == [10, 11, 12]
    assert memory.trim(3, 1.25) == 1 and memory.indices() == [10, 11]
    assert memory.trim(3, 0.5) == 2 and memory.counts() == {3: 0}
    assert memory.images() == []


# ------------------------------------------------------------------------------------------------ API
def test_exemplars_read_back_and_validation():
    generator = torch.Generator().manual_seed(8)
    images = random_images(generator, 3, (32, 32))
    boxes = torch.tensor([[2, 30, 4, 28], [0, 0, 0, 0], [0, 32, 0, 32]])
    exemplars = compress_exemplars(images, boxes, 4.0, "cam")
    memory = ExemplarMemory(ratio=4.0, mode="cam")
    memory.add_class(1, exemplars)
    back = memory.exemplars(1)
    for original, stored in zip(exemplars, back):
        assert stored.label == 1 and stored.box == original.box and stored.size == original.size
        assert torch.equal(stored.crop, original.crop) and stored.cost == original.cost
        kept = stored.small != 0
        assert torch.equal(stored.small[kept], original.small[kept])
    assert bool((back[2].small == 0).all())  # full box: nothing of the small image is stored
    with pytest.raises(ValueError, match="already stored"):
        memory.add_class(1, exemplars)
    memory.add_class(1, exemplars[:1], replace=True)
    assert memory.counts() == {1: 1}
    cheap = Exemplar(index=0, label=1, small=exemplars[0].small, crop=exemplars[0].crop, box=exemplars[0].box,
                     size=(32, 32), cost=0.1)
    with pytest.raises(ValueError, match="charged cost"):
        memory.add_class(2, [cheap])
    with pytest.raises(ValueError, match="mode"):
        ExemplarMemory(ratio=4.0, mode="cim")
    with pytest.raises(ValueError, match="stores no box"):
        ExemplarMemory(ratio=4.0, mode="downsample").add_class(0, [exemplars[0]])
    with pytest.raises(KeyError):
        memory.images(labels=[7])


def test_dataset_items_transform_and_label_map():
    generator = torch.Generator().manual_seed(10)
    images = random_images(generator, 4, (12, 12))
    boxes = random_boxes(generator, 4, 12, 12)
    memory = ExemplarMemory(ratio=2.0, mode="cam")
    memory.add_class(7, compress_exemplars(images[:2], boxes[:2], 2.0, "cam", indices=[3, 4]))
    memory.add_class(9, compress_exemplars(images[2:], boxes[2:], 2.0, "cam", indices=[5, 6]))
    transform = lambda image: image.float() / 255  # noqa: E731
    lazy = memory.dataset(transform, {7: 0, 9: 1})
    cached = memory.dataset(transform, {7: 0, 9: 1}, cache=True)
    assert len(lazy) == 4 and lazy.targets.tolist() == [0, 0, 1, 1] and lazy.indices.tolist() == [3, 4, 5, 6]
    expected = cim_ext.compress(torch.stack(images), boxes, 2.0).float() / 255
    for n in range(4):
        image, label, index = lazy[n]
        assert image.dtype == torch.float32 and torch.equal(image, expected[n])
        assert torch.equal(cached[n][0], image) and (label, index) == (cached[n][1], cached[n][2])
    only = memory.dataset(labels=[9])
    assert len(only) == 2 and only[0][1] == 9 and only[0][0].dtype == torch.uint8
    loader = torch.utils.data.DataLoader(lazy, batch_size=3)
    batches = list(loader)
    assert batches[0][0].shape == (3, 3, 12, 12) and batches[1][1].tolist() == [1]


def test_state_dict_round_trip():
    generator = torch.Generator().manual_seed(11)
    memory = ExemplarMemory(ratio=4.0, mode="cam")
    for label, size in [(4, (32, 32)), (2, (20, 36)), (8, (32, 32))]:
        images = random_images(generator, 5, size)
        memory.add_class(label, compress_exemplars(images, random_boxes(generator, 5, *size), 4.0, "cam",
                                                   indices=range(label * 10, label * 10 + 5)))
    memory.add_class(6, [])
    memory.trim(8, 1.0)
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = ExemplarMemory(ratio=4.0, mode="cam")
    restored.load_state_dict(state)
    assert restored.classes() == memory.classes() and restored.counts() == memory.counts()
    assert restored.indices() == memory.indices() and restored.targets() == memory.targets()
    assert restored.report() == memory.report()
    assert all(torch.equal(a, b) for a, b in zip(restored.images(), memory.images()))
    with pytest.raises(ValueError, match="mode"):
        ExemplarMemory(ratio=4.0, mode="downsample").load_state_dict(state)
    empty = ExemplarMemory(ratio=2.0, mode="none")
    again = ExemplarMemory(ratio=2.0, mode="none")
    again.load_state_dict(empty.state_dict())
    assert len(again) == 0 and again.classes() == []


def test_report_is_json_ready():
    import json

    generator = torch.Generator().manual_seed(12)
    memory = ExemplarMemory(ratio=4.0, mode="cam")
    memory.add_class(0, compress_exemplars(random_images(generator, 3, (32, 32)),
                                           random_boxes(generator, 3, 32, 32), 4.0, "cam"))
    report = json.loads(json.dumps(memory.report()))
    assert report["exemplars"] == 3 and report["classes"]["0"]["bytes"] == memory.bytes_held()
    assert report["bytes"] <= report["cost_bytes"]
