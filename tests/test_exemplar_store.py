"""training.exemplar_store and the memory on it: encoded parts on disk, bit-exact in PNG, references in checkpoints."""
import io
import os
import pickle

import pytest
import torch

from training.exemplar_store import ExemplarStore, ExemplarStoreError
from training.memory import ExemplarMemory, _kept_mask, compress_exemplars

from test_memory import random_boxes, random_images

CLASSES = [(4, (32, 32)), (2, (20, 36)), (8, (32, 32))]


def _fill(memory, mode="cam", seed=11):
    generator = torch.Generator().manual_seed(seed)
    for label, size in CLASSES:
        images = random_images(generator, 6, size)
        boxes = random_boxes(generator, 6, *size) if mode == "cam" else None
        memory.add_class(label, compress_exemplars(images, boxes, 4.0, mode, indices=range(label * 10, label * 10 + 6)))
    return memory


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer.getbuffer().nbytes, torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", ["none", "downsample", "cam"])
def test_png_store_is_bit_exact_and_checkpoints_carry_no_pixels(tmp_path, mode):
    in_ram = _fill(ExemplarMemory(ratio=4.0, mode=mode), mode)
    stored = _fill(ExemplarMemory(ratio=4.0, mode=mode, store=ExemplarStore(tmp_path / "memory")), mode)
    assert all(torch.equal(a, b) for a, b in zip(stored.images(), in_ram.images()))
    for label, _ in CLASSES:
        for a, b in zip(stored.exemplars(label), in_ram.exemplars(label)):
            assert torch.equal(a.small, b.small) and torch.equal(a.crop, b.crop) and a.box == b.box
    assert stored.report() == in_ram.report()  # raw bytes, costs and counts do not depend on where pixels live
    assert stored.encoded_bytes() > 0 and in_ram.encoded_bytes() == 0
    assert stored.store.file_bytes() == stored.encoded_bytes()  # nothing trimmed yet
    assert len(os.listdir(tmp_path / "memory")) == len(CLASSES)  # one shard per class

    stored.trim(8, 1.0)
    in_ram.trim(8, 1.0)
    size, state = _saved(stored.state_dict())
    assert "kept" not in state and "crops" not in state
    assert not any(t.dtype == torch.uint8 for t in state.values() if isinstance(t, torch.Tensor))
    # the index alone, below the pixels: torch.save's container (2.5 KB for an empty memory) and 160 bytes an
    # exemplar (metadata, cost, and two references with their crc32)
    assert size < 3072 + 200 * len(stored) < _saved(in_ram.state_dict())[0]
    restored = ExemplarMemory(ratio=4.0, mode=mode, store=ExemplarStore(tmp_path / "memory"))
    restored.load_state_dict(state)
    assert restored.report() == in_ram.report() and restored.indices() == in_ram.indices()
    assert all(torch.equal(a, b) for a, b in zip(restored.images(), in_ram.images()))
    assert stored.store.file_bytes() > stored.encoded_bytes()  # the trimmed exemplars stay in their shard


def test_shards_are_content_named_and_only_the_writer_writes(tmp_path):
    first = _fill(ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path / "a")))
    again = _fill(ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path / "a")))
    assert sorted(os.listdir(tmp_path / "a")) == sorted({r.refs[0].shard for rs in first._classes.values() for r in rs})
    assert again.state_dict()["shards"] == first.state_dict()["shards"]
    reader = _fill(ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path / "b", writer=False)))
    assert not os.path.exists(tmp_path / "b")
    assert torch.equal(reader.state_dict()["refs"], first.state_dict()["refs"])
    other = _fill(ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path / "c")), seed=12)
    assert set(other.state_dict()["shards"]).isdisjoint(first.state_dict()["shards"])


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_lossy_codecs_approximate_and_keep_unstored_pixels_zero(tmp_path, codec):
    generator = torch.Generator().manual_seed(3)
    smooth = [torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=generator), size=(32, 32),
                                              mode="bilinear").mul(255).to(torch.uint8)[0] for _ in range(4)]
    boxes = torch.tensor([[4, 20, 8, 28]] * 4)
    exemplars = compress_exemplars(smooth, boxes, 4.0, "cam")
    in_ram = ExemplarMemory(ratio=4.0, mode="cam")
    in_ram.add_class(0, exemplars)
    lossy = ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path, codec=codec, quality=95))
    lossy.add_class(0, exemplars)
    for a, b in zip(lossy.images(), in_ram.images()):
        assert (a.float() - b.float()).abs().mean() < 10  # 8x8 small images, 4:2:0 chroma
    for a in lossy.exemplars(0):
        unstored = ~_kept_mask(a.box, a.size, tuple(a.small.shape[1:]))
        assert bool(unstored.any()) and bool((a.small[:, unstored] == 0).all())
    png = ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path / "png"))
    png.add_class(0, exemplars)
    with pytest.raises(ValueError, match="codec 'png'"):
        png.load_state_dict(lossy.state_dict())


def test_pixel_state_moves_into_a_store_and_reference_state_needs_one(tmp_path):
    in_ram = _fill(ExemplarMemory(ratio=4.0, mode="cam"))
    moved = ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path))
    moved.load_state_dict(in_ram.state_dict())  # a checkpoint from before the store
    assert all(torch.equal(a, b) for a, b in zip(moved.images(), in_ram.images())) and moved.encoded_bytes() > 0
    with pytest.raises(ValueError, match="this memory has no store"):
        ExemplarMemory(ratio=4.0, mode="cam").load_state_dict(moved.state_dict())


def test_reads_are_lazy_cached_within_bound_and_survive_pickling(tmp_path):
    store = ExemplarStore(tmp_path, cache_bytes=3 * 16 * 16 * 2)
    memory = _fill(ExemplarMemory(ratio=4.0, mode="cam", store=store))
    expected = memory.images()
    assert store._cached <= store.cache_bytes
    dataset = pickle.loads(pickle.dumps(memory.dataset()))  # what a DataLoader worker gets
    assert dataset._memory.store._cached == 0
    assert all(torch.equal(dataset.load(i), expected[i]) for i in range(len(dataset)))
    os.remove(os.path.join(tmp_path, memory.state_dict()["shards"][0]))
    fresh = ExemplarMemory(ratio=4.0, mode="cam", store=ExemplarStore(tmp_path))
    fresh.load_state_dict(memory.state_dict())
    with pytest.raises(ExemplarStoreError, match="is missing"):
        fresh.images()


def test_bad_store_arguments():
    with pytest.raises(ValueError, match="codec: expected one of png, jpeg, webp"):
        ExemplarStore("x", codec="gif")
    with pytest.raises(ValueError, match=r"quality: expected an int in \[1, 100\]"):
        ExemplarStore("x", codec="jpeg", quality=0)
