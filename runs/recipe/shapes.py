"""A second dataset for the recipe study (issue 32): ten classes of drawn shapes as a folder of
small colour photos, the layout a user's own images have (`--dataset=folder:DIR`).

    python runs/recipe/shapes.py DIR [--train_per_class=1500] [--test_per_class=300] [--seed=0]
        [--clutter]

writes DIR/train/<class>/<i>.png and DIR/test/<class>/<i>.png, 32x32 RGB. Each image: a
background of one random colour with pixel noise, one shape of its class (outlined or filled;
circles always filled, rings never) at a random place, size, rotation, colour and line width
(`--clutter`: a two-colour gradient background and a low-contrast distractor stroke). Unlike
Fashion-MNIST the class is in the outline, not the grey-level texture; colour, position and
rotation carry no class information, so the strong augmentations' colour ops and flips keep the
label (a mirrored shape is the same shape). Deterministic for a --seed; the 18,000 images take
a few CPU-minutes.
"""
import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SCALE = 4   # drawn at 4x, then downsampled with antialiasing
CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'star', 'pentagon', 'arrow',
           'crescent', 'heart')


def _polygon(kind, rng):
    """The outline of one `kind` as unit-radius points around the origin (before rotation)."""
    if kind == 'square':
        return [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    if kind == 'triangle':
        return [(math.cos(a), math.sin(a)) for a in np.radians([90, 210, 330])]
    if kind == 'pentagon':
        return [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(5) * 72 + 90)]
    if kind == 'star':
        return [((1 if i % 2 == 0 else 0.42) * math.cos(a), (1 if i % 2 == 0 else 0.42) *
                 math.sin(a)) for i, a in enumerate(np.radians(np.arange(10) * 36 + 90))]
    if kind == 'cross':
        w = rng.uniform(0.22, 0.34)
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]
    if kind == 'arrow':
        return [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25),
                (-1, 0.25)]
    if kind == 'heart':
        t = np.linspace(0, 2 * math.pi, 40)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return list(zip(x / 17, -y / 17))
    raise ValueError(kind)


def draw(label: int, rng: np.random.Generator, clutter: bool = False) -> np.ndarray:
    """One [32, 32, 3] uint8 image of class `label`; `clutter`: a two-colour gradient background
    and a distractor stroke (else one background colour)."""
    n = SIZE * SCALE
    c0 = rng.integers(0, 256, 3)
    c1 = rng.integers(0, 256, 3) if clutter else c0
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * np.arange(n)[None, :] + np.sin(angle) * np.arange(n)[:, None]) / n
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    background = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    image = Image.fromarray(background.astype(np.uint8))
    pen = ImageDraw.Draw(image)
    if clutter:   # a distractor: a faint random stroke
        shade = np.clip(background.mean((0, 1)) + rng.normal(0, 25, 3), 0, 255)
        shade = tuple(int(v) for v in shade)
        pen.line([tuple(rng.uniform(0, n, 2)) for _ in range(3)], fill=shade, width=SCALE * 2)
    # the shape: colour far from the background's mean, so that it stays visible
    colour = rng.integers(0, 256, 3)
    while np.abs(colour - background.mean((0, 1))).sum() < 180:
        colour = rng.integers(0, 256, 3)
    colour = tuple(int(v) for v in colour)
    radius = rng.uniform(0.22, 0.42) * n
    cx, cy = rng.uniform(radius, n - radius, 2)
    width = int(rng.integers(2, 5)) * SCALE
    filled = rng.random() < 0.5
    kind = CLASSES[label]
    rot = rng.uniform(0, 2 * math.pi)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == 'circle':   # always filled: an outlined circle would be a ring
        pen.ellipse(box, fill=colour)
    elif kind == 'ring':   # always two outlines: a thick ring with a hole
        pen.ellipse(box, outline=colour, width=max(width, int(radius * 0.35)))
    elif kind == 'crescent':
        pen.ellipse(box, fill=colour)
        shift = radius * 0.5
        bg = tuple(int(v) for v in background[int(cy) % n, int(cx) % n])
        pen.ellipse([box[0] + shift * math.cos(rot), box[1] + shift * math.sin(rot),
                     box[2] + shift * math.cos(rot), box[3] + shift * math.sin(rot)], fill=bg)
    else:
        points = [(cx + radius * (x * math.cos(rot) - y * math.sin(rot)),
                   cy + radius * (x * math.sin(rot) + y * math.cos(rot)))
                  for x, y in _polygon(kind, rng)]
        if filled:
            pen.polygon(points, fill=colour)
        else:
            pen.line(points + points[:1], fill=colour, width=width, joint='curve')
    small = np.asarray(image.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    small += rng.normal(0, 8, small.shape)
    return np.clip(small, 0, 255).astype(np.uint8)


def write(root: str, train_per_class: int, test_per_class: int, seed: int,
          clutter: bool = False) -> None:
    rng = np.random.default_rng(seed)
    for part, count in (('train', train_per_class), ('test', test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, part, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = Image.fromarray(draw(label, rng, clutter))
                image.save(os.path.join(folder, f'{i:05d}.png'))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root')
    parser.add_argument('--train_per_class', type=int, default=1500)
    parser.add_argument('--test_per_class', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--clutter', action='store_true',
                        help='gradient backgrounds and a distractor stroke (a harder set: '
                        'small_cnn with 250 labels learns little of it)')
    args = parser.parse_args()
    write(args.root, args.train_per_class, args.test_per_class, args.seed, args.clutter)
