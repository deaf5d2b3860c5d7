"""SSCD embedders on real images that ship with scikit-image; presets; the folder reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from finextract.images import degenerate_mask, read_images
from finextract.sscd import SSCD_PRESETS, load_embedder, resize_crop


def _jpeg(image: np.ndarray, quality=75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _square(image, size=256):
    return np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("default")


def test_copy_scores_far_above_unrelated(embedder):
    astronaut, coffee, chelsea = _square(data.astronaut()), _square(data.coffee()), _square(data.chelsea())
    crop = astronaut[12:-12, 16:-8]  # mild crop, then JPEG re-encode and resize back
    copy = _square(_jpeg(crop, quality=70))
    d = embedder.embed(np.stack([astronaut, copy, coffee, chelsea]))
    assert d.shape == (4, 512) and d.dtype == torch.float32
    assert torch.allclose(d.norm(dim=1), torch.ones(4), atol=1e-4)
    s = d @ d.T
    assert s[0, 1] > 0.7
    assert max(s[0, 2], s[0, 3], s[2, 3]) < 0.3
    assert s[0, 1] - max(s[0, 2], s[0, 3], s[2, 3]) > 0.4


def test_info_and_batching(embedder):
    assert len(embedder.info["sha256"]) == 64 and embedder.info["sscd_preset"] == "sscd"
    images = np.stack([_square(data.astronaut(), 64), _square(data.coffee(), 64), _square(data.chelsea(), 64)])
    together = embedder.embed(images)
    apart = embedder.embed(images, batch_size=1)
    assert torch.allclose(together, apart, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed(images.astype(np.float32))


def test_paper_preset_shape_and_torchscript_user_model(tmp_path):
    x = torch.from_numpy(np.stack([_square(data.astronaut(), 300)]))
    y = resize_crop(x, SSCD_PRESETS["paper"])
    assert tuple(y.shape) == (1, 3, 224, 224)
    # A user's TorchScript SSCD-like model: global-average-pool of the normalised image (3-D descriptor).
    script = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
    script.save(str(tmp_path / "tiny.pt"))
    embedder = load_embedder(tmp_path / "tiny.pt", sscd_preset="paper")
    d = embedder.embed(x)
    expected = torch.nn.functional.normalize(((y / 255 - 0.5) / 0.5).mean(dim=(2, 3)), dim=1)
    assert torch.allclose(d, expected, atol=1e-5)
    assert embedder.info["kind"] == "torchscript" and embedder.info["crop"] == 224


def test_bad_model_file(tmp_path):
    (tmp_path / "model.bin").write_text("<html>not a model</html>")
    with pytest.raises(ValueError, match="TorchScript"):
        load_embedder(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError):
        load_embedder(tmp_path / "missing.onnx")


def test_read_images_skips_unreadable(tmp_path, caplog):
    Image.fromarray(_square(data.coffee(), 32)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n garbage")
    images, paths = read_images(tmp_path)
    assert [p.name for p in paths] == ["a.png"] and images[0].shape == (32, 32, 3)
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text


def test_degenerate_mask():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    images[1, 0, 0, 0] = 5
    assert degenerate_mask(images).tolist() == [True, False, True]


def test_threads_reach_the_onnx_session():
    """`--threads` (RunConfig.threads) sets the SSCD session's threads, not only torch's."""
    embedder = load_embedder("default", threads=1)
    assert embedder.session.get_session_options().intra_op_num_threads == 1
