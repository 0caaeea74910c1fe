"""training.data.boxes: true object boxes (several or none per image), best-match IoU, and ImageNet's localisation
annotations (XML files and LOC_*_solution.csv) read from a generated ILSVRC tree into a run's box IoU."""
import numpy as np
import pytest
import torch
from PIL import Image

from training.data import load_source
from training.data.boxes import ObjectBoxes, box_iou, imagenet_boxes
from training.run import main


def test_best_iou_picks_the_best_match_and_skips_images_without_boxes():
    truth = ObjectBoxes.from_lists([[(0, 10, 0, 10), (20, 30, 20, 30)], [], [(0, 4, 0, 4)]])
    assert len(truth) == 3 and truth.annotated() == 2 and truth.of(1).shape == (0, 4)
    boxes = torch.tensor([[20, 30, 20, 25], [0, 5, 0, 5], [0, 2, 0, 4]])
    got = truth.best_iou([0, 1, 2], boxes)
    assert got[0] == pytest.approx(0.5) and torch.isnan(got[1]) and got[2] == pytest.approx(0.5)
    assert torch.isnan(ObjectBoxes.from_lists([[], []]).best_iou([0, 1], boxes[:2])).all()
    single = ObjectBoxes.one_per_image(torch.tensor([[0, 10, 0, 10], [1, 2, 3, 4]]))
    boxes = torch.tensor([[1, 2, 3, 4], [0, 5, 0, 10]])
    expected = box_iou(boxes, torch.tensor([[1, 2, 3, 4], [0, 10, 0, 10]]))
    assert torch.equal(single.best_iou([1, 0], boxes), expected)


def _xml(path, boxes, size=(20, 16)):
    objects = "".join(
        f"<object><name>n0</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        "</bndbox></object>" for x0, y0, x1, y1 in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{objects}"
                    "</annotation>")


def _ilsvrc_tree(root, wnids=("n01000001", "n01000002", "n01000003"), per_class=3):
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(wnids):
        for k in range(per_class):
            folder = root / "train" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(folder / f"{wnid}_{k}.JPEG")
            if k < 2:  # the last image of each class has no annotation
                _xml(root / "bbox" / "train" / wnid / f"{wnid}_{k}.xml", [(1, 2, 10, 12), (5, 5, 19, 15)][: k + 1])
        val = root / "val" / wnid
        val.mkdir(parents=True, exist_ok=True)
        name = f"ILSVRC2012_val_{c + 1:08d}"
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(val / f"{name}.JPEG")
    return root


def test_imagenet_xml_and_csv(tmp_path):
    root = _ilsvrc_tree(tmp_path / "ilsvrc")
    source = load_source("imagenet1000", root)
    truth = source.train.object_boxes
    assert truth.annotated() == 6 and source.info["annotated_images"] == {"train": 6, "val": None}
    first = [i for i in range(len(source.train)) if source.train.path(i).endswith("n01000001_1.JPEG")][0]
    assert truth.of(first).tolist() == [[2, 13, 1, 11], [5, 16, 5, 20]]  # inclusive xmin..xmax -> half-open
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n01000002 0 0 9 7 n01000002 3 4 5 6 \n")
    val = imagenet_boxes(root, "val", [source.test.path(i) for i in range(len(source.test))])
    assert val.annotated() == 1 and [len(val.of(i)) for i in range(3)] == [0, 2, 0]
    assert imagenet_boxes(tmp_path, "train", ["x/n0_1.JPEG"]) is None


def test_imagenet_run_reports_box_iou(tmp_path):
    root = _ilsvrc_tree(tmp_path / "ilsvrc")
    summary = main(["--dataset", "imagenet1000", "--data-root", str(root), "--out", str(tmp_path / "run"), "--set",
                    "image_size=16", "backbone=resnet8", "init_cls=2", "increment=1", "memory_size=6",
                    "init_epochs=1", "incre_epochs=1", "compression_epochs=0", "batch_size=3", "meta_batch_size=2",
                    "cam_batch_size=4", "num_meta_iters_per_cls=1", "workers=0", "progress=false",
                    "tensorboard=false", "device=cpu", "augmentation=light"])
    for phase in summary["per_phase"]:
        assert 0 <= phase["extra"]["box_iou"] <= 1 and 0 < phase["extra"]["box_iou_whole_image"] <= 1
