"""The trained zoo's two fine-tuning scenarios (the paper's object- and style-driven sets) and the
images of every stage, all from files installed packages ship (no download)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..finetuning import load_images
from ..images import center_crop_resize
from ..style_images import style_images


@dataclass(frozen=True)
class Scenario:
    """One of the paper's two fine-tuning scenarios (the column groups of its Table 1)."""

    name: str
    folder: str  # inside the zoo: "." (the object scenario keeps the zoo's top level) or "style"
    caption: str
    description: str


SCENARIOS = {
    "object": Scenario(
        "object", ".", "a photo of sks", "object-driven: 5 photographs of different objects (scikit-image samples)"
    ),
    "style": Scenario(
        "style",
        "style",
        "an illustration in sks style",
        "style-driven: 10 drawings of different subjects in one flat, outlined style (finextract.style_images)",
    ),
    "heldout": Scenario(
        "heldout",
        "heldout",
        "a photo of sks",
        "held-out, object-driven: 5 images of different things that no test uses",
    ),
}
# What `zoo build --trained` builds and commits; "heldout" is trained on demand (`finextract zoo heldout`)
# to score choices made on these two (docs/results.md#time-to-evidence).
DEFAULT_SCENARIOS = ("object", "style")
CAPTION = SCENARIOS["object"].caption


def scenario_folder(zoo: str | Path, scenario: str) -> Path:
    """The folder of a scenario in a trained zoo: dreambooth/ (bare unet/), lora/, train/, caption.txt.

    Raises:
        ValueError: an unknown scenario.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    return (Path(zoo) / SCENARIOS[scenario].folder).resolve() if SCENARIOS[scenario].folder != "." else Path(zoo)


# The five held-apart fine-tuning photographs (scikit-image sample files), never seen by the base UNet.
FINETUNE_IMAGES = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png")
# Pretraining images: (package, file, caption). motorcycle_right.png is left out: it is nearly the
# same photograph as a fine-tuning one.
PRETRAIN_IMAGES = (
    ("sklearn", "china.jpg", "a photo of a temple"),
    ("sklearn", "flower.jpg", "a photo of a flower"),
    ("matplotlib", "grace_hopper.jpg", "a portrait of a woman"),
    ("skimage", "hubble_deep_field.jpg", "a photo of galaxies"),
    ("skimage", "retina.jpg", "a photo of a retina"),
    ("skimage", "ihc.png", "a microscopy image of tissue"),
    ("skimage", "camera.png", "a photo of a cameraman"),
    ("skimage", "moon.png", "a photo of the moon"),
    ("skimage", "coins.png", "a photo of coins"),
    ("skimage", "horse.png", "a silhouette of a horse"),
    ("skimage", "brick.png", "a photo of a brick wall"),
    ("skimage", "gravel.png", "a photo of gravel"),
    ("skimage", "grass.png", "a photo of grass"),
    ("skimage", "text.png", "a photo of text"),
    ("skimage", "page.png", "a scan of a page"),
    ("skimage", "logo.png", "a logo"),
    ("skimage", "cell.png", "a microscopy image of a cell"),
    ("skimage", "microaneurysms.png", "a photo of blood vessels"),
    ("skimage", "color.png", "a color wheel"),
    ("skimage", "clock_motion.png", "a photo of a clock"),
)


# The held-out scenario's images, name -> (package, file): files installed packages ship that no other
# stage uses, each a different kind of picture, as the object scenario's photographs are different
# objects: a gift box and the wide logo (on white), the Shepp-Logan CT phantom, the first 25 x 25 LFW
# face photograph, and an elevation map hill-shaded in gist_earth.
HELDOUT_IMAGES = {
    "present": ("matplotlib", "Minduka_Present_Blue_Pack.png"),
    "phantom": ("skimage", "phantom.png"),
    "face": ("skimage", "lfw_subset.npy"),
    "relief": ("matplotlib", "jacksboro_fault_dem.npz"),
    "logo": ("matplotlib", "logo2.png"),
}


def package_file(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage.data  # optional: skimage, sklearn, matplotlib (the [zoo] extra)

        path = Path(skimage.data.__file__).parent / name
    elif package == "sklearn":
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / name
    elif package == "matplotlib":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / name
    else:
        raise ValueError(f"unknown image package {package!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {package} (pip install 'finextract[zoo]')")
    return path


def finetune_photos(resolution: int = 32) -> np.ndarray:
    """The five fine-tuning photographs, centre-cropped and resized: uint8 (5, res, res, 3)."""
    return load_images([package_file("skimage", name) for name in FINETUNE_IMAGES], resolution)


def heldout_images() -> dict[str, np.ndarray]:
    """The held-out scenario's five images at their own size (`HELDOUT_IMAGES`): name -> uint8 (H, W, 3)."""
    from matplotlib import colormaps
    from matplotlib.colors import LightSource

    files = {name: package_file(*source) for name, source in HELDOUT_IMAGES.items()}

    def on_white(path: Path) -> np.ndarray:
        rgba = Image.open(path).convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))

    face = np.load(files["face"])[0]  # float in [0, 1]; the first 100 of the subset are faces
    elevation = np.load(files["relief"])["elevation"]
    relief = LightSource(azdeg=315, altdeg=45).shade(elevation, cmap=colormaps["gist_earth"], blend_mode="overlay")
    return {
        "present": on_white(files["present"]),
        "phantom": np.asarray(Image.open(files["phantom"]).convert("RGB")),
        "face": np.repeat((face * 255).round().astype(np.uint8)[..., None], 3, axis=2),
        "relief": (relief[..., :3] * 255).round().astype(np.uint8),
        "logo": on_white(files["logo"]),
    }


def finetune_set(scenario: str, resolution: int = 32) -> tuple[list[str], np.ndarray]:
    """A scenario's training images as the fine-tune sees them (`center_crop_resize`).

    Args:
        scenario: "object" (the five photographs), "style" (`finextract.style_images`) or "heldout"
            (`heldout_images`).
        resolution: side in pixels.

    Returns:
        (file stems, uint8 (n, resolution, resolution, 3)).

    Raises:
        ValueError: an unknown scenario.
    """
    if scenario == "object":
        return [Path(name).stem for name in FINETUNE_IMAGES], finetune_photos(resolution)
    if scenario == "style":
        drawings = style_images()
        return list(drawings), np.stack([center_crop_resize(image, resolution) for image in drawings.values()])
    if scenario == "heldout":
        images = heldout_images()
        return list(images), np.stack([center_crop_resize(image, resolution) for image in images.values()])
    raise ValueError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")


def random_crops(image: np.ndarray, count: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random square crops (side 30-100% of the short edge), resized, half of them flipped."""
    height, width = image.shape[:2]
    pil = Image.fromarray(image)
    out = np.empty((count, resolution, resolution, 3), np.uint8)
    for i in range(count):
        side = int(min(height, width) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = pil.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        crop = np.asarray(crop)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out
