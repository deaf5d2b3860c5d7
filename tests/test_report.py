"""The similarity histogram, the report's HTML helpers, and the training images as the fine-tune saw them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from finextract.cli import main


def _exact_descriptors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """Unit rows of +-1/4 entries (d = 16): every dot product is a multiple of 1/16, exact in float32
    whatever order a matrix product sums in, so the histogram can be checked bin for bin."""
    rng = np.random.default_rng(seed)
    return (rng.choice([-1.0, 1.0], size=(n, d)) / 4).astype(np.float32)


def test_similarity_histogram_counts_every_pair_once_in_the_clusterings_bins():
    from finextract.metrics import similarity_histogram

    x = _exact_descriptors(600)  # > one 512-row block: the triangular blocking is exercised
    histogram = similarity_histogram(x)
    sim = (x.astype(np.float64) @ x.T.astype(np.float64))[np.triu_indices(len(x), 1)]
    assert histogram["pairs"] == len(sim) == sum(histogram["counts"])
    step, first = histogram["step"], histogram["first"]
    for i, count in enumerate(histogram["counts"]):
        k = first + i  # bin k: float32(k step) <= S < float32((k + 1) step), the clustering's comparison
        lo, hi = np.float32(k * step), np.float32((k + 1) * step)
        assert count == int(((sim >= lo) & (sim < hi)).sum()), k
    # the pairs at or above a threshold t = k step (the clustering graph's edges) are a tail sum
    k = round(0.25 / step)
    assert sum(histogram["counts"][k - first :]) == int((sim >= np.float32(0.25)).sum())
    with pytest.raises(ValueError, match="N >= 2"):
        similarity_histogram(x[:1])


def test_metrics_against_all_generated_bound_the_extracted_ones():
    from finextract.metrics import extraction_metrics

    rng = np.random.default_rng(1)
    generated = rng.normal(size=(40, 8)).astype(np.float32)
    generated /= np.linalg.norm(generated, axis=1, keepdims=True)
    train = generated[[3, 17]] + 0.05 * rng.normal(size=(2, 8)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    m = extraction_metrics(train, generated[[17, 30]], generated)
    # extracted images are a subset of the generated ones: their best match can only be as good
    assert m["generated"]["AS"] >= m["AS"] - 1e-7
    assert [b["generated"] for b in m["generated"]["best_match"]] == [3, 17]
    assert m["best_match"][1]["extracted"] == 0
    expected = float(np.mean([(train[0] * generated[3]).sum(), (train[1] * generated[17]).sum()]))
    assert m["generated"]["AS"] == pytest.approx(expected, abs=1e-6)  # float32 dot products of 8 terms


def test_image_tags_scale_small_images_up_with_nearest_neighbour(tmp_path):
    from finextract.report import display_width, image, settings_table, similarity_text, table

    assert display_width(32) == (128, True) and display_width(96) == (192, True) and display_width(512) == (128, False)
    tag = image(np.zeros((32, 32, 3), np.uint8))
    assert 'width="128"' in tag and 'class="pixelated"' in tag and tag.count("data:image/png;base64,") == 1
    path = tmp_path / "sub" / "a.png"
    path.parent.mkdir()
    Image.fromarray(np.zeros((20, 600, 3), np.uint8)).save(path)
    tag = image(path, out=tmp_path)
    assert 'src="sub/a.png"' in tag and 'width="128"' in tag and "pixelated" not in tag
    assert "strict" in similarity_text(0.71) and "loose" in similarity_text(0.65) and "<" not in similarity_text(0.6)
    html = table(("a<b", "n"), [("<i>x</i>", 3)], numeric=(1,))
    assert "<th>a&lt;b</th>" in html and "<td><i>x</i></td>" in html and '<td class="num">3</td>' in html
    html = settings_table(
        {"run": {"steps": 2, "seed": None}, "seeds": list(range(10, 30)), "skip": {"me": 1}}, skip=("skip",)
    )
    assert "run.steps" in html and "run.seed" not in html and "10 .. 29" in html and "me" not in html


def test_report_says_how_modes_picked_instead_of_the_sweep(tmp_path):
    from finextract.report import write_report

    result = {"cliques": [[0, 2], [1]], "threshold": 0.5, "n0": 2, "config": {"clustering": {"selection": "modes"}}}
    html = write_report(tmp_path, result, []).read_text()
    assert "selection modes" in html and "similarity \u2265 0.5" in html and "peeling maximum cliques" not in html
    result["config"]["clustering"]["selection"] = "size"
    html = write_report(tmp_path, result, []).read_text()
    assert "selection modes" not in html and "peeling maximum cliques" in html


def _originals():
    """Three non-square, larger-than-the-model photographs as users have them (H x W: 300x451, 400x600, 512x512)."""
    return [data.chelsea(), data.coffee(), data.astronaut()]


def test_evaluate_crops_training_images_as_the_fine_tune_saw_them(tmp_path, capsys):
    """A model that memorised its training images perfectly generates their 32 px centre crops. Scored
    against the full-size, non-square originals as they are, those perfect extractions look poor; as
    the fine-tune saw them (centre crop, 32 px) they score 1."""
    from finextract.images import center_crop_resize

    train, extracted = tmp_path / "train", tmp_path / "extracted"
    train.mkdir()
    extracted.mkdir()
    for i, original in enumerate(_originals()):
        Image.fromarray(original).save(train / f"t{i}.png")
        Image.fromarray(center_crop_resize(original, 32)).save(extracted / f"e{i}.png")
    as_seen = tmp_path / "as_seen.json"
    assert main(["evaluate", "--extracted", str(extracted), "--train", str(train), "--json", str(as_seen)]) == 0
    metrics = json.loads(as_seen.read_text())
    # identical 32 px images give identical descriptors: cosine 1 up to float32 rounding of 512 terms
    assert metrics["AS"] == pytest.approx(1.0, abs=1e-5) and metrics["A-ESR0.7"] == 1.0
    assert metrics["train_transform"] == {
        "name": "center_crop_resize",
        "resolution": 32,  # inferred from the extracted images' common square size
        "crop": "largest centred square",
        "resample": "bicubic",
    }
    assert [m["train_size"] for m in metrics["best_match"]] == [[300, 451], [400, 600], [512, 512]]
    as_is = tmp_path / "as_is.json"
    assert (
        main(["evaluate", "--extracted", str(extracted), "--train", str(train), "--train-as-is", "--json", str(as_is)])
        == 0
    )
    metrics_as_is = json.loads(as_is.read_text())
    assert metrics_as_is["train_transform"] == {"name": "as-is"}
    # the problem this fixes: the same perfect extractions score far lower against the originals
    assert metrics_as_is["AS"] < metrics["AS"] - 0.1, metrics_as_is["AS"]
    capsys.readouterr()
    # mixed sizes and no result.json: the resolution cannot be inferred, and the error says what to pass
    Image.fromarray(np.zeros((20, 30, 3), np.uint8) + 50).save(extracted / "odd.png")
    assert main(["evaluate", "--extracted", str(extracted), "--train", str(train)]) == 1
    assert "pass --resolution N, or --train-as-is" in capsys.readouterr().err


def test_infer_resolution_reads_the_extract_folders_result_json(tmp_path):
    from finextract.commands.evaluate import infer_resolution

    run = tmp_path / "run"
    (run / "extracted").mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"config": {"models": {"resolution": 64}}}))
    images = [np.zeros((32, 32, 3), np.uint8)]
    assert infer_resolution(run / "extracted", images) == (64, str(run / "result.json"))
    assert infer_resolution(tmp_path, images) == (32, f"the size of the images in {tmp_path}")


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    from finextract.extract import Extractor
    from finextract.zoo.build import build_zoo

    zoo = build_zoo(tmp_path_factory.mktemp("zoo"))
    return Extractor(zoo / "base", zoo / "dreambooth", device="cpu", backend="torch")


def test_extraction_scored_against_large_originals_matches_its_score_against_the_crops(extractor, tmp_path):
    from finextract.evaluation import evaluate_against
    from finextract.images import center_crop_resize
    from finextract.report import similarity_text
    from finextract.sscd import embed_images

    assert extractor.resolution == 32  # the tiny zoo: 16 x 16 latents, a x2 VAE
    originals = _originals()
    result = extractor.extract(
        "a photo of sks", 2, num_images=6, steps=2, batch_size=6, out=tmp_path / "run", train=originals, progress=False
    )
    crops = [center_crop_resize(image, 32) for image in originals]
    against_crops, _ = evaluate_against(crops, result.descriptors, extractor.embedder, resolution=None)
    # the same 32 px images reach SSCD either way: the same descriptors, the same scores
    assert result.metrics["AS"] == pytest.approx(against_crops["AS"], abs=1e-6)
    assert [m["similarity"] for m in result.metrics["best_match"]] == pytest.approx(
        [m["similarity"] for m in against_crops["best_match"]], abs=1e-6
    )
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["metrics"]["train_transform"]["resolution"] == 32
    assert record["config"]["models"]["resolution"] == 32
    # every usable generated image's descriptor is kept; the best match among them bounds the extracted one
    assert result.generated_descriptors.shape == (6, result.descriptors.shape[1])
    assert result.generated_indices == list(range(6))
    assert record["metrics"]["generated"]["AS"] >= record["metrics"]["AS"] - 1e-6
    assert sum(record["similarity_histogram"]["counts"]) == 6 * 5 // 2
    # each training image's best matches are the maxima of its similarity row: against all generated
    # images and against the extracted ones (float32 dot products of 512 terms: 1e-5)
    train_descriptors = embed_images(extractor.embedder, crops, "training").cpu().numpy()
    generated = result.generated_descriptors.cpu().numpy()
    rows = train_descriptors @ generated.T
    for i, match in enumerate(record["metrics"]["generated"]["best_match"]):
        assert match["generated"] == int(rows[i].argmax())
        assert match["similarity"] == pytest.approx(float(rows[i].max()), abs=1e-5)
    rows = train_descriptors @ result.descriptors.cpu().numpy().T
    for i, match in enumerate(record["metrics"]["best_match"]):
        assert match["extracted"] == int(rows[i].argmax())
        assert match["similarity"] == pytest.approx(float(rows[i].max()), abs=1e-5)
    report = (tmp_path / "run" / "report.html").read_text()
    # the page shows those numbers (3 decimals), the clique sizes and the threshold
    for match in record["metrics"]["best_match"] + record["metrics"]["generated"]["best_match"]:
        assert f"similarity {similarity_text(match['similarity'])}" in report
    assert f"clique sizes: {record['clique_sizes']}" in report
    # the default preset's "modes": its radius; the paper's "size": the threshold of the sweep
    modes = record["config"]["clustering"].get("selection") == "modes"
    threshold = f"similarity \u2265 {record['threshold']} to another" if modes else f"threshold {record['threshold']}"
    assert threshold in report
    assert f'<td class="num">{record["metrics"]["AS"]:.3f}</td>' in report
    for text in (
        "Each training image and its best matches",
        "best match among all N generated",
        "451\u00d7300 \u2192 crop, 32\u00d732",
        'alt="similarity histogram"',
        "train_transform.resolution",
        "run.steps",
        "other clique members",
    ):
        assert text in report, text
    as_is = extractor.extract(
        "a photo of sks", 2, num_images=6, steps=2, batch_size=6, train=originals, train_as_is=True, progress=False
    )
    assert as_is.metrics["train_transform"] == {"name": "as-is"}
    assert as_is.indices == result.indices  # the same generation and clustering; only the scoring differs


def test_image_folder_finds_the_images_inside_output_folders(tmp_path):
    from finextract.images import image_folder

    plain = tmp_path / "plain"
    plain.mkdir()
    generate = tmp_path / "gen"
    generate.mkdir()
    (generate / "manifest.json").write_text("{}")
    run = tmp_path / "run"
    for sub in ("extracted", "generation", "generated"):
        (run / sub).mkdir(parents=True)
    (run / "result.json").write_text("{}")
    clustered = tmp_path / "clusters"
    (clustered / "extracted").mkdir(parents=True)
    (clustered / "result.json").write_text("{}")
    assert image_folder(plain, "generated") == plain and image_folder(generate, "extracted") == generate
    assert image_folder(run, "extracted") == run / "extracted"
    assert image_folder(run, "generated") == run / "generation"  # the chunks, before --save-generated's PNGs
    (run / "generation").rmdir()
    assert image_folder(run, "generated") == run / "generated"
    assert image_folder(clustered, "extracted") == clustered / "extracted"
    with pytest.raises(ValueError, match=r"without generated images .* it has extracted/"):
        image_folder(clustered, "generated")


def test_cluster_and_evaluate_read_an_extract_output_folder(extractor, tmp_path, capsys):
    train = tmp_path / "train"
    train.mkdir()
    for i, original in enumerate(_originals()):
        Image.fromarray(original).save(train / f"t{i}.png")
    run = tmp_path / "run"
    result = extractor.extract(
        "a photo of sks", 2, num_images=6, steps=2, batch_size=6, out=run, train=train, progress=False
    )
    capsys.readouterr()
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--extracted", str(run), "--train", str(train), "--json", str(metrics)]) == 0
    printed = capsys.readouterr().out
    assert f"written to {metrics}" in printed
    scored = json.loads(metrics.read_text())
    # run/extracted/ read, the resolution from run/result.json: the same images and crops as the extraction,
    # so the same scores up to float32 rounding of SSCD's 512-term dot products
    assert scored["train_transform"]["resolution"] == 32
    assert scored["AS"] == pytest.approx(result.metrics["AS"], abs=1e-5)
    assert f"AS {scored['AS']:.3f}, A-ESR0.6 {scored['A-ESR0.6']:.3f}, A-ESR0.7 {scored['A-ESR0.7']:.3f}" in printed
    assert main(["cluster", "--images", str(run), "--n0", "2", "--out", str(tmp_path / "clusters")]) == 0
    clustered = json.loads((tmp_path / "clusters" / "result.json").read_text())
    assert clustered["num_images"] == 6  # all of run/generation, not the 2 extracted images
