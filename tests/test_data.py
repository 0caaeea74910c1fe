"""training.data: sources and their layouts, bad images, synthetic generator, class order, transforms, phases."""
import re
import warnings

import numpy as np
import pytest
import torch

from training.data import (
    BadImageError,
    BadImageWarning,
    DataRootError,
    PhaseDataset,
    SyntheticSpec,
    build_transform,
    class_glyphs,
    class_indices,
    class_order,
    collate_skip_bad,
    imagenet100_wnids,
    load_source,
    phase_classes,
)
from training.data.synthetic import generate
from trees import food101_tree, imagenet_tree, write_jpeg

# ------------------------------------------------------------------------------------------------------- helpers


SMALL = dict(num_classes=20, train_per_class=3, test_per_class=2)

# ------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_per_seed():
    a = generate(SyntheticSpec(seed=3, **SMALL), "train")
    b = generate(SyntheticSpec(seed=3, **SMALL), "train")
    c = generate(SyntheticSpec(seed=4, **SMALL), "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    test = generate(SyntheticSpec(seed=3, **SMALL), "test")
    assert not torch.equal(a.images[: len(test.images)], test.images)  # splits are different draws


@pytest.mark.parametrize("size", [32, 64])
def test_synthetic_shapes_boxes_and_glyphs(size):
    spec = SyntheticSpec(image_size=size, noise=0.0, seed=1, **SMALL)
    split = generate(spec, "train")
    n = spec.num_classes * spec.train_per_class
    assert split.images.shape == (n, 3, size, size) and split.images.dtype == torch.uint8
    assert split.targets.dtype == torch.int64 and split.targets.tolist() == sorted(split.targets.tolist())
    assert split.boxes.shape == (n, 4) and split.boxes.dtype == torch.int64
    y0, y1, x0, x1 = split.boxes.unbind(1)
    g = spec.object_size
    assert g == 6 * size // 16
    assert bool(((y1 - y0) == g).all() and ((x1 - x0) == g).all())
    assert bool((y0 >= spec.margin).all() and (x0 >= spec.margin).all())
    assert bool((y1 <= size - spec.margin).all() and (x1 <= size - spec.margin).all())
    glyphs = class_glyphs(spec).repeat(1, size // 16, size // 16)
    for i in range(n):
        box = split.images[i, :, y0[i] : y1[i], x0[i] : x1[i]].int()
        colours = torch.unique(box.reshape(3, -1), dim=1)
        assert colours.shape[1] == 2, "the glyph is drawn in exactly two colours"
        bright = box.sum(0) > colours.sum(0).float().mean()
        assert torch.equal(bright, glyphs[split.targets[i]]), f"image {i}: box does not hold its class object"


def test_synthetic_glyph_design_hides_class_under_2x_subsampling():
    spec = SyntheticSpec(num_classes=24, seed=5)
    glyphs = class_glyphs(spec)
    assert len({tuple(g.flatten().tolist()) for g in glyphs}) == 24
    lattices = [sorted(tuple(g[py::2, px::2].flatten().tolist()) for py in (0, 1) for px in (0, 1)) for g in glyphs]
    assert all(lat == lattices[0] for lat in lattices), "every class shows the same 4 sub-patterns"
    assert len(set(lattices[0])) == 4
    subs = {tuple(g[0::2, 0::2].flatten().tolist()) for g in glyphs}
    flipped = {tuple(g[0::2, 0::2].flip(-1).flatten().tolist()) for g in glyphs}
    assert not subs & flipped, "a flipped glyph must not be another class's glyph"
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=25)


def test_synthetic_source():
    source = load_source("synthetic", seed=2, **SMALL)
    assert source.num_classes == 20 and len(source.class_names) == 20 and source.image_size == 32
    assert len(source.train) == 60 and len(source.test) == 40
    image = source.train.load(7)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert source.train.targets.dtype == np.int64
    assert source.train.object_boxes.boxes.shape == (60, 4) and source.train.bad_count == 0
    with pytest.raises(TypeError, match="valid: num_classes"):
        load_source("synthetic", colour="red")
    with pytest.raises(ValueError, match="choose one of: synthetic, imagefolder, tinyimagenet, imagenet1000, "
                                         "imagenet100, food101"):
        load_source("cifar10")
    with pytest.raises(ValueError, match="on_bad_image"):
        load_source("synthetic", on_bad_image="ignore")


# ------------------------------------------------------------------------------------------------ order and phases


def test_class_order_matches_pycil_seed_1993():
    assert class_order(100)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # PODNet imagenet100_1order.yaml
    order = class_order(20, seed=7)
    assert sorted(order) == list(range(20)) and order == class_order(20, seed=7) and order != class_order(20)


def test_phase_classes():
    assert phase_classes(10, 4, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert phase_classes(10, 5, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert phase_classes(10, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert phase_classes(6, 6, 2) == [list(range(6))]
    with pytest.raises(ValueError, match="init_cls"):
        phase_classes(10, 11, 1)
    with pytest.raises(ValueError, match="increment"):
        phase_classes(10, 2, 0)


# ------------------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("kind", ["train", "test", "cam"])
@pytest.mark.parametrize("augment", [True, False])
def test_transform_output(kind, augment):
    transform = build_transform(kind, 24, augment=augment)
    for shape in [(3, 40, 57), (3, 24, 24), (3, 17, 30)]:
        out = transform(torch.randint(0, 256, shape, dtype=torch.uint8))
        assert out.dtype == torch.float32 and out.shape == (3, 24, 24)


def test_light_test_transform_keeps_native_pixels():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for kind in ("test", "cam"):
        out = build_transform(kind, 32, augment=False)(image)
        torch.testing.assert_close(out, (image.float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="train, test, cam"):
        build_transform("val", 32)


# ------------------------------------------------------------------------------------------------- file sources

WNIDS = ["n01440764", "n01443537", "n01484850"]


def test_imagenet1000_folder_with_corrupt_file(tmp_path):
    imagenet_tree(tmp_path, WNIDS)
    write_jpeg(tmp_path / "train" / WNIDS[1] / "gray.JPEG", mode="L")
    write_jpeg(tmp_path / "train" / WNIDS[1] / "cmyk.JPEG", mode="CMYK")
    bad = tmp_path / "train" / WNIDS[2] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (tmp_path / "train" / WNIDS[0] / "notes.txt").write_text("ignored: not an image extension")

    source = load_source("imagenet1000", tmp_path)
    assert source.info["layout"] == "imagefolder"
    assert source.num_classes == 3 and source.class_names == WNIDS
    assert len(source.train) == 9 and len(source.test) == 3
    for i in range(len(source.train)):
        path = source.train.path(i)
        assert path.split("/")[-2] == source.class_names[source.train.targets[i]]
    bad_index = [source.train.path(i) for i in range(len(source.train))].index(str(bad))

    with pytest.warns(BadImageWarning, match=re.escape(str(bad))):
        loaded = [source.train.load(i) for i in range(len(source.train))]
    assert loaded[bad_index] is None and source.train.bad_count == 1 and source.bad_count == 1
    assert all(x.dtype == torch.uint8 and x.shape == (3, 10, 12) for k, x in enumerate(loaded) if k != bad_index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file is neither decoded nor warned about again
        assert source.train.load(bad_index) is None
    assert source.train.bad_count == 1

    transform = build_transform("test", 8, augment=False)
    dataset = PhaseDataset(source.train, np.arange(len(source.train)), transform, {0: 2, 1: 0, 2: 1})
    assert dataset[bad_index] is None
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate_skip_bad)
    images, labels, indices = next(iter(loader))
    assert images.shape == (8, 3, 8, 8) and bad_index not in indices.tolist()
    mapped = {0: 2, 1: 0, 2: 1}
    assert labels.tolist() == [mapped[int(source.train.targets[i])] for i in indices.tolist()]

    strict = load_source("imagenet1000", tmp_path, on_bad_image="error")
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        strict.train.load(bad_index)


def test_bad_count_is_shared_with_loader_workers(tmp_path):
    imagenet_tree(tmp_path, WNIDS[:2], per_class=3)
    (tmp_path / "train" / WNIDS[0] / "zero.JPEG").write_bytes(b"")
    source = load_source("imagenet1000", tmp_path)
    dataset = PhaseDataset(source.train, np.arange(len(source.train)), build_transform("cam", 8), {0: 0, 1: 1})
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        seen = sum(len(batch[1]) for batch in loader if batch is not None)
    assert seen == 6 and source.train.bad_count == 1


def test_torchvision_imagenet_root(tmp_path):
    imagenet_tree(tmp_path, WNIDS)
    torch.save(({w: (f"class {w}",) for w in WNIDS}, [WNIDS[0]] * 3), tmp_path / "meta.bin")
    source = load_source("imagenet1000", tmp_path)
    assert source.info["layout"] == "torchvision"
    assert source.class_names == WNIDS and len(source.train) == 6 and len(source.test) == 3
    assert source.train.load(0).shape == (3, 10, 12)


def test_bad_roots_name_the_layout(tmp_path):
    with pytest.raises(DataRootError, match="needs a data root"):
        load_source("imagenet1000")
    with pytest.raises(DataRootError, match=r"it does not exist\. Expected either the ImageFolder layout "
                                            r"<root>/train/<wnid>/\*\.JPEG"):
        load_source("imagenet1000", tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataRootError, match="has no class folders") as info:
        load_source("imagenet100", tmp_path)
    assert "datasets.ImageNet" in str(info.value) and len(str(info.value).splitlines()) == 1
    imagenet_tree(tmp_path, WNIDS, val_per_class=0)
    write_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataRootError, match="raw ILSVRC2012 validation layout"):
        load_source("imagenet1000", tmp_path)
    with pytest.raises(DataRootError, match="Expected <root>/train/<class>/<image>"):
        load_source("imagefolder", tmp_path / "nothing")
    with pytest.raises(DataRootError, match="Expected the official Food-101 archive layout"):
        load_source("food101", tmp_path)
    with pytest.raises(TypeError, match="unknown option"):
        load_source("imagenet1000", tmp_path, num_classes=3)


@pytest.mark.parametrize("name", ["imagefolder", "tinyimagenet", "imagenet1000", "imagenet100", "food101"])
def test_a_missing_root_and_a_file_root_are_told_apart(tmp_path, name):
    with pytest.raises(DataRootError, match=r"cannot use data root '.*missing': it does not exist\. Expected"):
        load_source(name, tmp_path / "missing")
    (tmp_path / "file").write_text("not a tree")
    with pytest.raises(DataRootError, match=r"cannot use data root '.*file': it is not a directory\. Expected"):
        load_source(name, tmp_path / "file")


def test_parts_of_a_layout_that_are_missing_or_of_the_wrong_kind(tmp_path):
    (tmp_path / "train").write_text("")
    with pytest.raises(DataRootError, match=r"train is not a directory\. Expected"):
        load_source("imagefolder", tmp_path)
    imagenet_tree(tmp_path / "tree", ["cat"])
    (tmp_path / "tree" / "val" / "cat" / "ILSVRC2012_val_000000.JPEG").unlink()
    (tmp_path / "tree" / "val" / "cat").rmdir()
    with pytest.raises(DataRootError, match=r"val has no class folders and .*test does not exist\. Expected"):
        load_source("imagefolder", tmp_path / "tree")
    food = food101_tree(tmp_path / "food")
    (food / "meta" / "train.txt").unlink()
    (food / "meta" / "train.txt").mkdir()
    with pytest.raises(DataRootError, match=r"train\.txt is a directory, not a file\. Expected"):
        load_source("food101", food)


def test_a_wrong_imagenet100_tree_names_a_few_missing_classes_and_the_count(tmp_path):
    imagenet_tree(tmp_path, WNIDS)  # ImageNet classes, none of them in ImageNet-100
    with pytest.raises(DataRootError) as info:
        load_source("imagenet100", tmp_path)
    message = str(info.value)
    wnids = imagenet100_wnids()
    assert f"100 of the 100 classes have no image files (extensions .jpg" in message
    assert f"{', '.join(wnids[:5])} ... (100 in all). Expected" in message
    assert len(re.findall(r"n\d{8}", message)) == 5 and len(message) < 700 and "\n" not in message


def test_near_miss_options_and_classes_get_a_suggestion():
    with pytest.raises(TypeError, match=r"synthetic: unknown option\(s\) num_class; valid: num_classes, image_size, "
                                        r".*, tiles; did you mean 'num_classes'\?$"):
        load_source("synthetic", num_class=3)
    with pytest.raises(ValueError, match=r"no class 'glpyh03' in this source \(its classes: glyph00, glyph01, "
                                         r"glyph02, glyph03, glyph04 \.\.\. \(20 in all\)\); did you mean "
                                         r"'glyph03'\?$"):
        load_source("synthetic", classes=["glpyh03"], **SMALL)
    with pytest.raises(ValueError, match=r"unknown dataset 'tinyimagnet'; .*; did you mean 'tinyimagenet'\?"):
        load_source("tinyimagnet")


def test_imagefolder_empty_class_and_extra_val_class(tmp_path):
    imagenet_tree(tmp_path, ["cat", "dog"])
    source = load_source("imagefolder", tmp_path, image_size=64)
    assert source.class_names == ["cat", "dog"] and source.image_size == 64
    (tmp_path / "val" / "eel").mkdir()
    write_jpeg(tmp_path / "val" / "eel" / "x.jpg")
    with pytest.raises(DataRootError, match="class folders missing from"):
        load_source("imagefolder", tmp_path)
    (tmp_path / "train" / "eel").mkdir()
    (tmp_path / "train" / "fox").mkdir()
    with pytest.raises(DataRootError, match="fox"):
        load_source("imagefolder", tmp_path)


def test_food101_layout(tmp_path):
    root = food101_tree(tmp_path / "food-101")
    classes = ["apple_pie", "baby_back_ribs", "ramen"]
    for given in (root, tmp_path):  # the food-101 folder itself or the folder that holds it
        source = load_source("food101", given)
        assert source.class_names == classes and len(source.train) == 6 and len(source.test) == 3
        assert source.test.targets.tolist() == [0, 1, 2]
        assert source.train.load(5).shape == (3, 10, 12)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    assert load_source("food101", root).num_classes == 3
    (root / "meta" / "test.txt").write_text("ramen 102\n")
    with pytest.raises(DataRootError, match=r"meta/test.txt line 1 is 'ramen 102'"):
        load_source("food101", root)


def test_imagenet100_list_and_selection(tmp_path):
    wnids = imagenet100_wnids()
    assert len(wnids) == 100 and len(set(wnids)) == 100 and wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[:3] == ["n01514668", "n01531178", "n01537544"]
    extra = ["n01440764", "n01443537"]
    assert not set(extra) & set(wnids)
    imagenet_tree(tmp_path, wnids + extra, per_class=1, val_per_class=1, size=(4, 4))
    source = load_source("imagenet100", tmp_path)
    assert source.num_classes == 100 and source.class_names == wnids
    assert len(source.train) == 100 and len(source.test) == 100
    for split in (source.train, source.test):
        for i in range(0, 100, 17):
            assert split.path(i).split("/")[-2] == wnids[split.targets[i]]
    full = load_source("imagenet1000", tmp_path)
    assert full.num_classes == 102
    for path in sorted((tmp_path / "train" / wnids[5]).iterdir()):
        path.unlink()
    with pytest.raises(DataRootError, match=wnids[5]):
        load_source("imagenet100", tmp_path)


# ------------------------------------------------------------------------------------------------- phase datasets


def test_phase_dataset_and_collate():
    source = load_source("synthetic", **SMALL)
    order = class_order(20)
    phases = phase_classes(20, 10, 5)
    classes = [order[p] for p in phases[1]]
    label_map = {c: p for p, c in enumerate(order)}
    indices = class_indices(source.train, classes)
    assert len(indices) == 15 and set(source.train.targets[indices].tolist()) == set(classes)
    dataset = PhaseDataset(source.train, indices, build_transform("train", 32, augment=False), label_map)
    image, label, index = dataset[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert index == indices[4] and label == label_map[int(source.train.targets[index])] and 10 <= label < 15
    batch = collate_skip_bad([None, dataset[0], None, dataset[1]])
    assert batch[0].shape == (2, 3, 32, 32) and batch[2].tolist() == indices[:2].tolist()
    assert collate_skip_bad([None, None]) is None
