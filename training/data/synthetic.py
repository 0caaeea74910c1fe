"""Procedural image set whose class evidence is a small, fine-grained object on a class-independent background.

Each image holds one *object*: a class *glyph* (a ``2s x 2s`` binary pattern), tiled ``t x t`` times, drawn in two
colours (bright on dark) at a random position, on a cluttered background (colour gradient, opaque blobs, thin lines,
decoy patches, pixel noise) drawn from the same distribution for every class. The glyph of a class interleaves four
fixed ``s x s`` sub-patterns ``A_0..A_3`` on the four 2x2 sub-lattices (row parity, column parity); a class is one
assignment (a permutation of the four) of the sub-patterns to the sub-lattices, so there are at most 24 classes.

Why compression hurts here: nearest-exact downsampling by 2 per side (compression ratio 4) keeps exactly one
sub-lattice of the image. Which one is kept depends on the parity of the object's random position, so the surviving
sub-pattern is one of ``A_0..A_3`` with the same probability for every class: the class evidence is gone and a
classifier of whole-image downsampled inputs is at chance. Keeping the object's box at full resolution (the box is
:attr:`SyntheticSplit.boxes`) keeps all the evidence. The sub-patterns are chosen so that no horizontally flipped
sub-pattern is one of them; a flipped glyph is therefore never another class's glyph (flip augmentation keeps labels).

Everything is drawn from a ``torch.Generator`` seeded from ``seed``: the same seed gives bit-identical tensors.
"""
import itertools
from dataclasses import dataclass

import torch

__all__ = ["SyntheticSpec", "SyntheticSplit", "class_glyphs", "generate", "MAX_CLASSES"]

MAX_CLASSES = 24  # permutations of the four sub-patterns

_SPLIT_STREAMS = {"design": 0, "train": 1, "test": 2, "heldout": 3}


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic image set.

    Args:
        num_classes: 2..24.
        image_size: side S of the square images (>= 16).
        train_per_class, test_per_class: images per class in each split.
        heldout_per_class: images per class of the ``"heldout"`` split (training-like images kept out of training,
            e.g. to calibrate a box threshold); 0: none.
        seed: every random draw (glyph design, layouts, colours) derives from it.
        cell: side s of a sub-pattern; the glyph is 2s x 2s. ``None``: 3.
        tiles: the object is the glyph tiled ``tiles x tiles`` times (the period 2s is even, so every tile shows the
            same sub-lattices): the object grows with the image while its detail stays one pixel. ``None``:
            ``max(1, S // 16)``, i.e. a 12 x 12 object at 32 x 32 and 24 x 24 at 64 x 64 (14 % of the image).
        decoys: object-sized patches per image in the object's colours, never overlapping it: random binary
            patterns drawn in 2x2 pixel cells, i.e. what any object looks like after compression.
        blobs, lines: background clutter per image.
        noise: standard deviation of the Gaussian pixel noise, in 0..255 units.
    """

    num_classes: int = 20
    image_size: int = 32
    train_per_class: int = 100
    test_per_class: int = 40
    heldout_per_class: int = 0
    seed: int = 0
    cell: int | None = None
    tiles: int | None = None
    decoys: int = 2
    blobs: int = 4
    lines: int = 3
    noise: float = 8.0

    def __post_init__(self):
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"synthetic: num_classes must be in 2..{MAX_CLASSES}, got {self.num_classes}")
        if self.image_size < 16:
            raise ValueError(f"synthetic: image_size must be >= 16, got {self.image_size}")
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise ValueError("synthetic: train_per_class and test_per_class must be >= 1")
        if self.heldout_per_class < 0:
            raise ValueError(f"synthetic: heldout_per_class must be >= 0, got {self.heldout_per_class}")
        if self.cell is not None and self.cell < 2:
            raise ValueError(f"synthetic: cell must be >= 2, got {self.cell}")
        if self.tiles is not None and self.tiles < 1:
            raise ValueError(f"synthetic: tiles must be >= 1, got {self.tiles}")
        if self.object_size + 2 * self.margin > self.image_size:
            raise ValueError(f"synthetic: the {self.object_size} x {self.object_size} object (2 * cell * tiles) and "
                             f"its {self.margin}-pixel margins do not fit in {self.image_size} x {self.image_size}")
        for name in ("decoys", "blobs", "lines"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic: {name} must be >= 0, got {getattr(self, name)}")
        if self.noise < 0:
            raise ValueError(f"synthetic: noise must be >= 0, got {self.noise}")

    @property
    def glyph_cell(self) -> int:
        return self.cell if self.cell is not None else 3

    @property
    def glyph_size(self) -> int:
        return 2 * self.glyph_cell

    @property
    def glyph_tiles(self) -> int:
        return self.tiles if self.tiles is not None else max(1, self.image_size // 16)

    @property
    def object_size(self) -> int:
        """Side of the object (and of its box): the glyph tiled ``glyph_tiles`` times."""
        return self.glyph_size * self.glyph_tiles

    @property
    def margin(self) -> int:
        """Distance kept between the glyph and the image border (a random crop with padding S/8 keeps it whole)."""
        return self.image_size // 8


@dataclass
class SyntheticSplit:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    targets: torch.Tensor  # int64 [N], class-sorted
    boxes: torch.Tensor  # int64 [N, 4] (y0, y1, x0, x1), half-open: the object


def _generator(seed, stream):
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1_000_003 + _SPLIT_STREAMS[stream]) % (2**63))
    return gen


def _sub_patterns(cell, gen):
    """Four distinct, non-constant s x s binary patterns, none equal to a horizontal flip of any of them."""
    chosen = []
    while len(chosen) < 4:
        cand = torch.rand(cell, cell, generator=gen) < 0.5
        frac = cand.float().mean().item()
        if not 0.3 <= frac <= 0.7:
            continue
        flipped = cand.flip(-1)
        if torch.equal(cand, flipped):
            continue
        if any(torch.equal(cand, a) or torch.equal(flipped, a) for a in chosen):
            continue
        chosen.append(cand)
    return torch.stack(chosen)


def class_glyphs(spec: SyntheticSpec) -> torch.Tensor:
    """Glyph of every class, bool Tensor[C, 2s, 2s] (True: bright pixel)."""
    gen = _generator(spec.seed, "design")
    cell = spec.glyph_cell
    subs = _sub_patterns(cell, gen)
    perms = list(itertools.permutations(range(4)))
    pick = torch.randperm(len(perms), generator=gen)[: spec.num_classes].tolist()
    glyphs = torch.zeros(spec.num_classes, 2 * cell, 2 * cell, dtype=torch.bool)
    for c, p in enumerate(pick):
        for lattice, sub in enumerate(perms[p]):
            py, px = divmod(lattice, 2)
            glyphs[c, py::2, px::2] = subs[sub]
    return glyphs


def _paste(canvas, patterns, ys, xs, fg, bg, active):
    """Write 2-colour patterns bool [N, g, g] at (ys, xs) into canvas [N, 3, S, S] (in place) where ``active``."""
    rows_n = active.nonzero().flatten()
    g = patterns.shape[-1]
    rows = (ys[rows_n, None] + torch.arange(g))[:, :, None]  # [n, g, 1]
    cols = (xs[rows_n, None] + torch.arange(g))[:, None, :]  # [n, 1, g]
    colour = torch.where(patterns[rows_n, :, :, None], fg[rows_n, None, None, :], bg[rows_n, None, None, :])
    canvas[rows_n[:, None, None], :, rows, cols] = colour  # advanced indices first: [n, g, g, 3]


def _background(n, size, spec, gen):
    """Gradient, then blobs, then lines (later layers on top): Tensor[N, 3, S, S] float in [0, 1]."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    # colour gradient along a random direction
    c1, c2 = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    angle = torch.rand(n, 1, 1, generator=gen) * (2 * torch.pi)
    t = coords[None, None, :] * angle.cos() + coords[None, :, None] * angle.sin()  # [N, S, S]
    low, high = t.amin((1, 2), keepdim=True), t.amax((1, 2), keepdim=True)
    t = ((t - low) / (high - low + 1e-6))[:, None]
    img = c1 + (c2 - c1) * t
    # layers, later on top: opaque elliptic blobs (0..blobs per image), then thin segments (0..lines per image).
    # `top` holds, per pixel, the id of the topmost layer covering it (0: none); ids grow in drawing order.
    top = torch.zeros(n, size * size, dtype=torch.int64)
    palette = [torch.zeros(n, 1, 3)]
    if spec.blobs:
        k = spec.blobs
        count = torch.randint(0, k + 1, (n, 1), generator=gen)
        centre = torch.rand(n, k, 2, generator=gen)
        radius = 0.06 + 0.2 * torch.rand(n, k, 2, generator=gen)
        palette.append(torch.rand(n, k, 3, generator=gen))
        dy = ((coords - centre[..., 0:1]) / radius[..., 0:1]) ** 2  # [N, k, S], separable ellipse test
        dx = ((coords - centre[..., 1:2]) / radius[..., 1:2]) ** 2
        drawn = torch.arange(k) < count  # [N, k]
        for b in range(k):
            inside = (dy[:, b, :, None] + dx[:, b, None, :] <= 1) & drawn[:, b, None, None]
            top.masked_fill_(inside.reshape(n, -1), b + 1)
    if spec.lines:
        k, first = spec.lines, 1 + spec.blobs
        count = torch.randint(0, k + 1, (n, 1), generator=gen)
        ends = torch.rand(n, k, 2, 2, generator=gen) * size  # [N, k, end, (y, x)] in pixels
        wide = torch.randint(0, 2, (n, k), generator=gen).bool()  # 1- or 2-pixel brush
        palette.append(torch.rand(n, k, 3, generator=gen))
        steps = torch.linspace(0, 1, 2 * size)[:, None]  # < 1 pixel apart
        points = ends[:, :, None, 0] + steps * (ends[:, :, None, 1] - ends[:, :, None, 0])  # [N, k, M, 2]
        pixel = points.floor().long()
        ids = torch.where(torch.arange(k) < count, torch.arange(first, first + k), 0)  # [N, k]
        for oy, ox in ((0, 0), (0, 1), (1, 0), (1, 1)):
            y, x = pixel[..., 0] + oy, pixel[..., 1] + ox
            use = (y < size) & (x < size) & (wide[..., None] | (oy + ox == 0))
            index = (y.clamp(max=size - 1) * size + x.clamp(max=size - 1)).reshape(n, -1)
            value = torch.where(use, ids[..., None], 0).reshape(n, -1)
            top.scatter_reduce_(1, index, value, "amax")
    if len(palette) > 1:
        colours = torch.cat(palette, 1)  # [N, layers + 1, 3]
        layer = colours.gather(1, top[..., None].expand(-1, -1, 3)).permute(0, 2, 1).reshape(n, 3, size, size)
        img = torch.where(top.reshape(n, 1, size, size) > 0, layer, img)
    return img


def generate(spec: SyntheticSpec, split: str) -> SyntheticSplit:
    """Render the ``"train"``, ``"test"`` or ``"heldout"`` split of ``spec`` (deterministic; about a second for 10k 32x32 images)."""
    if split not in ("train", "test", "heldout"):
        raise ValueError(f"synthetic: split must be 'train', 'test' or 'heldout', got {split!r}")
    per_class = {"train": spec.train_per_class, "test": spec.test_per_class, "heldout": spec.heldout_per_class}[split]
    glyphs = class_glyphs(spec)
    gen = _generator(spec.seed, split)
    size, g, margin = spec.image_size, spec.object_size, spec.margin
    targets = torch.arange(spec.num_classes).repeat_interleave(per_class)
    n = targets.numel()

    img = _background(n, size, spec, gen)
    # glyph colours: bright foreground, dark background, random hues; decoys share them
    fg = 0.65 + 0.35 * torch.rand(n, 3, generator=gen)
    bg = 0.35 * torch.rand(n, 3, generator=gen)
    y0 = torch.randint(margin, size - g - margin + 1, (n,), generator=gen)
    x0 = torch.randint(margin, size - g - margin + 1, (n,), generator=gen)
    tries = 16
    for _ in range(spec.decoys):
        # blocky: a random s x s pattern in 2x2 pixel cells, which is what a glyph looks like once compressed
        cells = torch.rand(n, g // 2, g // 2, generator=gen) < 0.5
        pattern = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)
        cy = torch.randint(0, size - g + 1, (n, tries), generator=gen)
        cx = torch.randint(0, size - g + 1, (n, tries), generator=gen)
        # a candidate is free when its box (grown by one pixel) misses the glyph's box
        free = ((cy + g + 1 <= y0[:, None]) | (cy - 1 >= y0[:, None] + g)
                | (cx + g + 1 <= x0[:, None]) | (cx - 1 >= x0[:, None] + g))
        first = free.float().argmax(1)
        found = free.any(1)
        pick = torch.arange(n)
        _paste(img, pattern, cy[pick, first], cx[pick, first], fg, bg, found)
    objects = glyphs.repeat(1, spec.glyph_tiles, spec.glyph_tiles)
    _paste(img, objects[targets], y0, x0, fg, bg, torch.ones(n, dtype=torch.bool))
    if spec.noise > 0:
        img = img + torch.randn(img.shape, generator=gen) * (spec.noise / 255)
    images = (img * 255).round_().clamp_(0, 255).to(torch.uint8)
    boxes = torch.stack([y0, y0 + g, x0, x0 + g], dim=1)
    return SyntheticSplit(images=images, targets=targets, boxes=boxes)
