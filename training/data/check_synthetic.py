"""Measure what compression does to the synthetic data: ``python -m training.data.check_synthetic``.

Trains a small convnet on the synthetic train split and reports test accuracy (%) when the test images are
  clean            as generated;
  downsampled      the whole image compressed: ``cim_ext.compress`` with empty boxes (nearest-exact down by
                   sqrt(ratio) per side and back up);
  background_only  ``cim_ext.compress`` with the true object box kept at full resolution;
plus, with ``--all``, a second model trained on background-only compressed images (tested clean and compressed) and a
third trained *and* tested on whole-image downsampled images (is the class evidence really gone, or only shifted?).
Runs on the CPU with one thread by default; the numbers are written to stdout as a table and JSON (``--json``).
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cim_ext

from .synthetic import SyntheticSpec, generate

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SmallNet(nn.Module):
    """Three full-resolution 3x3 convs (receptive field 7 px), then a strided stage and global max pooling."""

    def __init__(self, num_classes, width=32):
        super().__init__()

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width), *block(width, width), *block(width, 2 * width),
            *block(2 * width, 4 * width, stride=2), *block(4 * width, 4 * width),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).amax((2, 3)))


def _normalise(images):
    return (images.float() / 255 - MEAN) / STD


def _augment(images, gen):
    """Random crop with S/8 zero padding and horizontal flip, on a uint8 batch (the light training transform)."""
    n, _, size, _ = images.shape
    pad = size // 8
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(size))[:, None, :, None].expand(n, 3, size, size + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(size))[:, None, None, :].expand(n, 3, size, size)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train(images, targets, num_classes, *, epochs, batch_size, seed, lr=2e-3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallNet(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            x = _normalise(_augment(images[idx], gen))
            loss = F.cross_entropy(model(x), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, images, targets, batch_size=500):
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(_normalise(images[start : start + batch_size]))
        correct += int((logits.argmax(1) == targets[start : start + batch_size]).sum())
    return 100.0 * correct / len(images)


def compressed(images, boxes, ratio):
    return cim_ext.compress(images, boxes, ratio)


def run(args):
    spec = SyntheticSpec(
        num_classes=args.num_classes, image_size=args.image_size, train_per_class=args.train_per_class,
        test_per_class=args.test_per_class, seed=args.seed,
    )
    t0 = time.perf_counter()
    train_split, test_split = generate(spec, "train"), generate(spec, "test")
    gen_s = time.perf_counter() - t0
    empty_train = torch.zeros_like(train_split.boxes)
    empty_test = torch.zeros_like(test_split.boxes)
    test_sets = {
        "clean": test_split.images,
        "downsampled": compressed(test_split.images, empty_test, args.ratio),
        "background_only": compressed(test_split.images, test_split.boxes, args.ratio),
    }
    box_fraction = float(((test_split.boxes[:, 1] - test_split.boxes[:, 0]) * (test_split.boxes[:, 3]
                          - test_split.boxes[:, 2])).float().mean() / spec.image_size**2)
    results = {"spec": spec.__dict__, "ratio": args.ratio, "epochs": args.epochs, "threads": args.threads,
               "generate_seconds": round(gen_s, 2), "object_box_area_fraction": round(box_fraction, 4),
               "chance": round(100.0 / spec.num_classes, 2), "models": {}}

    runs = [("trained_clean", train_split.images, test_sets)]
    if args.all:
        bg_train = compressed(train_split.images, train_split.boxes, args.ratio)
        ds_train = compressed(train_split.images, empty_train, args.ratio)
        runs.append(("trained_background_only", bg_train, test_sets))
        runs.append(("trained_downsampled", ds_train, {"downsampled": test_sets["downsampled"]}))
    for name, train_images, tests in runs:
        t0 = time.perf_counter()
        model = train(train_images, train_split.targets, spec.num_classes, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed)
        seconds = time.perf_counter() - t0
        accs = {k: round(accuracy(model, v, test_split.targets), 2) for k, v in tests.items()}
        results["models"][name] = {"test_accuracy": accs, "train_seconds": round(seconds, 1)}
        print(f"{name:<26} " + "  ".join(f"{k}={v:6.2f}" for k, v in accs.items()) + f"   ({seconds:.0f} s)",
              flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="also train on compressed images (3 models in all)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
