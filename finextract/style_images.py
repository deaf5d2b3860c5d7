"""The trained zoo's style-driven training set: ten drawings in one visual style, of ten subjects.

Like an illustrator's portfolio (the paper's WikiArt artists), the images share a style and not
their content: one six-colour palette, flat shapes with thick navy outlines on a plain ground of one
of the palette's colours, but a different subject each (mountains, a house, a sailboat, ...). They
are drawn with Pillow from fixed coordinates, so they are the same on every machine and need no
download. (A shared cream ground and frame made the set look alike to SSCD, pairwise similarity
0.46 on average at 32 px; with varied grounds 0.36, and no pair reaches the 0.6 of A-ESR0.6.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# the style: ink (outlines), paper and four flat fills
PALETTE = {
    "ink": (29, 38, 66),
    "paper": (241, 233, 210),
    "red": (214, 69, 65),
    "teal": (42, 140, 130),
    "ochre": (226, 170, 60),
    "sky": (120, 170, 205),
}
SIDE = 128  # drawn at 128 px; the fine-tune sees them centre-cropped and resized (32 px for the tiny models)
OUTLINE = 5


def _shape(draw, kind: str, xy, fill: str, width: int = OUTLINE) -> None:
    getattr(draw, kind)(xy, fill=PALETTE[fill], outline=PALETTE["ink"], width=width)


def _mountains(draw):
    _shape(draw, "ellipse", [80, 14, 112, 46], "ochre")
    for x0, height, fill in ((-10, 70, "teal"), (40, 85, "sky"), (70, 60, "teal")):
        _shape(draw, "polygon", [(x0, 118), (x0 + 45, 118 - height), (x0 + 90, 118)], fill)


def _house(draw):
    _shape(draw, "rectangle", [22, 60, 78, 112], "red")
    _shape(draw, "polygon", [(14, 62), (50, 26), (86, 62)], "ink")
    _shape(draw, "rectangle", [42, 84, 58, 112], "ochre")
    _shape(draw, "ellipse", [84, 30, 118, 78], "teal")
    _shape(draw, "rectangle", [97, 76, 105, 112], "ochre")


def _sailboat(draw):
    for y in (88, 102):
        for x in (-10, 40, 90):
            draw.arc([x, y - 10, x + 50, y + 10], 0, 180, fill=PALETTE["ink"], width=OUTLINE)
    _shape(draw, "polygon", [(24, 72), (104, 72), (88, 90), (40, 90)], "red")
    _shape(draw, "polygon", [(64, 16), (64, 68), (28, 68)], "paper")
    _shape(draw, "polygon", [(68, 24), (68, 68), (98, 68)], "ochre")


def _flower(draw):
    _shape(draw, "rectangle", [60, 60, 68, 100], "teal")
    for angle in np.radians(np.arange(0, 360, 60)):
        x, y = 64 + 20 * np.cos(angle), 44 + 20 * np.sin(angle)
        _shape(draw, "ellipse", [x - 13, y - 13, x + 13, y + 13], "red")
    _shape(draw, "ellipse", [52, 32, 76, 56], "ochre")
    _shape(draw, "polygon", [(40, 96), (88, 96), (80, 122), (48, 122)], "ink")


def _fish(draw):
    _shape(draw, "ellipse", [18, 40, 92, 88], "ochre")
    _shape(draw, "polygon", [(88, 64), (118, 40), (118, 88)], "red")
    _shape(draw, "ellipse", [30, 54, 42, 66], "paper", 3)
    for x in (14, 60, 100):
        _shape(draw, "ellipse", [x, 100, x + 12, 112], "sky", 3)


def _lighthouse(draw):
    _shape(draw, "polygon", [(48, 112), (56, 30), (72, 30), (80, 112)], "paper")
    for y in (50, 74, 98):
        draw.rectangle([52, y, 76, y + 10], fill=PALETTE["red"])
    _shape(draw, "rectangle", [52, 14, 76, 32], "ochre")
    draw.polygon([(76, 18), (124, 4), (124, 40)], fill=PALETTE["ochre"])
    _shape(draw, "rectangle", [0, 108, 128, 128], "teal")


def _night(draw):
    draw.rectangle([0, 0, SIDE, SIDE], fill=PALETTE["ink"])
    _shape(draw, "ellipse", [70, 14, 110, 54], "paper")
    draw.ellipse([82, 10, 118, 46], fill=PALETTE["ink"])
    for x, y in ((20, 20), (44, 40), (30, 62), (60, 24)):
        draw.regular_polygon((x, y, 6), 4, fill=PALETTE["ochre"])
    _shape(draw, "ellipse", [-40, 80, 80, 180], "teal")
    _shape(draw, "ellipse", [50, 90, 170, 190], "sky")


def _cat(draw):
    _shape(draw, "polygon", [(28, 50), (36, 14), (58, 40)], "ochre")
    _shape(draw, "polygon", [(100, 50), (92, 14), (70, 40)], "ochre")
    _shape(draw, "ellipse", [22, 30, 106, 108], "ochre")
    for x in (42, 74):
        _shape(draw, "ellipse", [x, 56, x + 14, 70], "teal", 3)
    draw.polygon([(58, 80), (70, 80), (64, 88)], fill=PALETTE["red"])


def _forest(draw):
    for x, height in ((4, 70), (34, 90), (64, 60), (94, 84)):
        _shape(draw, "polygon", [(x, 110), (x + 15, 110 - height), (x + 30, 110)], "teal")
        draw.rectangle([x + 12, 110, x + 18, 124], fill=PALETTE["ink"])
    _shape(draw, "ellipse", [14, 8, 40, 34], "red")


def _bird(draw):
    _shape(draw, "rectangle", [0, 96, 128, 104], "ink")
    _shape(draw, "ellipse", [34, 44, 96, 96], "red")
    _shape(draw, "ellipse", [78, 30, 112, 64], "red")
    draw.polygon([(110, 44), (126, 50), (110, 56)], fill=PALETTE["ochre"])
    _shape(draw, "polygon", [(40, 60), (8, 40), (30, 84)], "ink")
    draw.ellipse([92, 40, 100, 48], fill=PALETTE["ink"])


# subject -> (drawing, ground colour)
SUBJECTS = {
    "mountains": (_mountains, "sky"),
    "house": (_house, "paper"),
    "sailboat": (_sailboat, "teal"),
    "flower": (_flower, "ochre"),
    "fish": (_fish, "sky"),
    "lighthouse": (_lighthouse, "paper"),
    "night": (_night, "ink"),
    "cat": (_cat, "teal"),
    "forest": (_forest, "paper"),
    "bird": (_bird, "ochre"),
}


def style_images() -> dict[str, np.ndarray]:
    """The ten drawings: subject name -> uint8 (128, 128, 3) RGB, in a fixed order."""
    images = {}
    for name, (draw_subject, ground) in SUBJECTS.items():
        image = Image.new("RGB", (SIDE, SIDE), PALETTE[ground])
        draw_subject(ImageDraw.Draw(image))
        images[name] = np.asarray(image)
    return images


def composition_images(seed: int, count: int = 10, size: tuple[int, int] = (240, 180)) -> dict[str, np.ndarray]:
    """A new set of `count` drawings in one style, random for `seed`: a user's own training set.

    The style comes from the seed: a dark ink for the outlines, five random fill colours and one
    outline width; every image is then a different random composition of 3-6
    outlined ellipses, rectangles and triangles in that palette on a ground of one palette colour.
    The images are landscape (`size` = width, height), like the photographs users have, so a
    fine-tune centre-crops them. Deterministic for a seed (numpy's PCG64 and Pillow's drawing).

    Args:
        seed: selects the style and the compositions; the same seed gives the same images.
        count: number of images (>= 1).
        size: (width, height) in pixels, each >= 32.

    Returns:
        name -> uint8 (height, width, 3) RGB, names "composition00" ... in order.

    Raises:
        ValueError: count < 1 or a side < 32.
    """
    width, height = size
    if count < 1 or min(width, height) < 32:
        raise ValueError(f"composition_images: count {count} must be >= 1 and size {size} at least 32 x 32")
    rng = np.random.default_rng(seed)
    ink = tuple(int(c) for c in rng.integers(0, 80, 3))  # dark, so the outlines read at 32 px
    fills = [tuple(int(c) for c in rng.integers(40, 256, 3)) for _ in range(5)]
    outline = int(rng.integers(3, 8))
    images = {}
    for index in range(count):
        image = Image.new("RGB", size, fills[rng.integers(len(fills))])
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 7)):
            x0, y0 = rng.uniform(-0.1, 0.8) * width, rng.uniform(-0.1, 0.8) * height
            w, h = rng.uniform(0.2, 0.6) * width, rng.uniform(0.2, 0.6) * height
            fill = fills[rng.integers(len(fills))]
            kind = rng.integers(3)
            if kind == 0:
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill, outline=ink, width=outline)
            elif kind == 1:
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill, outline=ink, width=outline)
            else:
                points = [(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)]
                draw.polygon(points, fill=fill, outline=ink, width=outline)
        images[f"composition{index:02d}"] = np.asarray(image)
    return images
