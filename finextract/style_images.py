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
    from PIL import Image, ImageDraw

    images = {}
    for name, (draw_subject, ground) in SUBJECTS.items():
        image = Image.new("RGB", (SIDE, SIDE), PALETTE[ground])
        draw_subject(ImageDraw.Draw(image))
        images[name] = np.asarray(image)
    return images
