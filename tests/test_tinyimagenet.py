"""The tinyimagenet source (official layout, object boxes, subsets, grayscale JPEGs, errors), its bundled config, the
box IoU it reports against the whole-image baseline, and the shared 50-class subset where it is present."""
import json
import os

import pytest
import torch

from training.cim import box_iou
from training.data import DataRootError, load_source
from training.run import main
from trees import tinyimagenet_tree, write_jpeg

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                      "tiny-imagenet-sub50")
TINY_RUN = [
    "data_options={}", "image_size=16", "backbone=resnet8", "init_cls=2", "increment=1", "memory_size=6",
    "init_epochs=1",
    "incre_epochs=1", "compression_epochs=1", "batch_size=4", "meta_batch_size=2", "cam_batch_size=4",
    "num_meta_iters_per_cls=1", "cam_update_interval=1", "workers=0", "progress=false", "tensorboard=false",
    "device=cpu",
]


def test_source_reads_the_official_layout(tmp_path):
    root = tinyimagenet_tree(tmp_path / "tiny")
    source = load_source("tinyimagenet", root)
    assert source.num_classes == 3 and source.image_size == 64
    assert source.class_names == ["thing n01, another name", "thing n02, another name", "thing n03, another name"]
    assert len(source.train) == 12 and len(source.test) == 6
    image = source.train.load(0)  # grayscale JPEG
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    # inclusive x0 y0 x1 y1 -> half-open (y0, y1, x0, x1)
    assert source.train.object_boxes.of(1).tolist() == [[2, 15, 1, 16]]
    assert source.test.object_boxes.of(1).tolist() == [[0, 2, 0, 16]]
    assert source.train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_source_keeps_the_classes_wnids_lists(tmp_path):
    root = tinyimagenet_tree(tmp_path / "tiny", listed=["n03", "n01"])
    source = load_source("tinyimagenet", root)
    assert source.num_classes == 2 and source.info["wnids"] == ["n01", "n03"]
    assert len(source.train) == 8 and len(source.test) == 4 and len(source.test.object_boxes) == 4
    first = load_source("tinyimagenet", root, num_classes=1)
    assert first.info["wnids"] == ["n01"] and len(first.train) == 4
    with pytest.raises(ValueError, match="num_classes must be an int in"):
        load_source("tinyimagenet", root, num_classes=3)


def test_source_keeps_the_first_train_per_class_images(tmp_path):
    root = tinyimagenet_tree(tmp_path / "tiny")
    source = load_source("tinyimagenet", root, train_per_class=3)
    assert source.train.targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3 and len(source.test) == 6
    assert source.train.object_boxes.of(4).tolist() == [[2, 15, 1, 16]]  # image 1 of class 1: the file's order
    with pytest.raises(ValueError, match="train_per_class must be an int >= 1"):
        load_source("tinyimagenet", root, train_per_class=0)


@pytest.mark.parametrize("damage, words", [
    (lambda root: (root / "wnids.txt").unlink(), "wnids.txt does not exist"),
    (lambda root: ((root / "wnids.txt").unlink(), (root / "wnids.txt").mkdir()), "wnids.txt is a directory, not a file"),
    (lambda root: (root / "val" / "val_annotations.txt").unlink(), "val_annotations.txt does not exist"),
    (lambda root: (root / "train" / "n02" / "n02_boxes.txt").write_text("a.JPEG 1 2 3\n"), "expected 5 fields"),
    (lambda root: (root / "train" / "n02" / "n02_boxes.txt").write_text("a.JPEG 1 2 x 3\n"), "four integer"),
    (lambda root: (root / "train" / "n01" / "images" / "n01_0.JPEG").unlink(), "n01_0.JPEG does not exist"),
])
def test_bad_roots_name_the_problem_and_the_layout(tmp_path, damage, words):
    root = tinyimagenet_tree(tmp_path / "tiny")
    damage(root)
    with pytest.raises(DataRootError, match=words) as info:
        load_source("tinyimagenet", root)
    assert "official Tiny ImageNet layout" in str(info.value)
    with pytest.raises(DataRootError, match="it does not exist"):
        load_source("tinyimagenet", tmp_path / "missing")


def test_run_reports_box_iou_against_the_whole_image(tmp_path):
    root = tinyimagenet_tree(tmp_path / "tiny")
    out = tmp_path / "run"
    summary = main(["--dataset", "tinyimagenet", "--data-root", str(root), "--out", str(out), "--set", *TINY_RUN])
    assert summary["finished"] and summary["phases_done"] == 2
    truth = load_source("tinyimagenet", root).train.object_boxes.boxes
    whole = torch.tensor([[0, 16, 0, 16]] * 4)
    for phase, classes in zip(summary["per_phase"], ([0, 1], [2])):
        extra = phase["extra"]
        assert 0 <= extra["box_iou"] <= 1
        # the whole-image baseline over the phase's new-class images (every image here is 16x16)
        expected = float(torch.cat([box_iou(whole, truth[4 * c: 4 * c + 4]) for c in classes]).mean())
        assert extra["box_iou_whole_image"] == pytest.approx(expected)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "box_iou_whole_image" in lines[-1]["extra"]


def test_imagefolder_as_documented(tmp_path):
    """``--dataset imagefolder --data-root DIR`` starts from the real-photo (tinyimagenet) config, without data
    options."""
    for split, count in (("train", 4), ("val", 2)):
        for c in range(3):
            for k in range(count):
                write_jpeg(tmp_path / "data" / split / f"class{c}" / f"{k}.jpg", (16, 16), seed=c * 10 + k)
    summary = main(["--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--out",
                    str(tmp_path / "run"), "--set", *TINY_RUN])
    assert summary["finished"] and summary["phases_done"] == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["data_options"] == {} and config["dataset"] == "imagefolder"
    assert (config["beta1"], config["class_weight_counts"], config["fc_bias"]) == (0.97, "nominal", False)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the shared Tiny ImageNet subset is not here")
def test_shared_subset_loads():
    source = load_source("tinyimagenet", SHARED)
    assert source.num_classes == 50 and len(source.train) == 25000 and len(source.test) == 2500
    boxes = source.train.object_boxes.boxes
    assert source.train.object_boxes.annotated() == 25000
    assert int(boxes[:, [1, 3]].max()) == 64 and int(boxes[:, [0, 2]].min()) == 0
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double() / 64 ** 2
    assert 0.4 < float(area.mean()) < 0.6  # "mean box area is about half the image" (shared/data/README.md)
