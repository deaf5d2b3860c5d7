"""Fleet audits: the manifest, the local executor, Ray (2 workers, a worker killed mid-row), resume, Ctrl-C.

One manifest on the random tiny zoo serves every end-to-end test: three LoRA files of one base (one row
long enough to be killed mid-generation), an unconditional DreamBooth row, and the bad rows the summary
must report without stopping (a text file saved as weights, a missing file, an id used twice, a
missing field). The local executor and Ray must write the same images, byte for byte: both run the
same `RowRunner` with one thread per row, and image i always starts from seed + i.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finextract.fleet import ManifestError, Row, RowError, audit, read_manifest
from finextract.spec import DEFAULT_PRESET, PRESETS
from finextract.store.chunks import finished_count

# rows that extract (in manifest order) and rows that must fail, by id
COMPUTED = ("lora_long", "lora_peft", "db_uncond")
FAILING = ("broken", "missing", "twice", "no_n0")
RUN = dict(backend="torch", device="cpu", threads=1, batch_size=4, steps=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_zoo):
    """The manifest (CSV, relative paths) beside a broken checkpoint and two training images."""
    from skimage import data

    folder = tmp_path_factory.mktemp("fleet_inputs")
    (folder / "broken.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    train = folder / "train"
    train.mkdir()
    for name in ("astronaut", "coffee"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((32, 32), Image.BICUBIC)
        image.save(train / f"{name}.png")
    zoo = os.path.relpath(tiny_zoo, folder)
    lora = f"{zoo}/lora/pytorch_lora_weights.safetensors"
    lines = [
        "id,base,finetuned,lora,caption,n0,train,num_images,steps",
        # 4 chunks of 4 images x 4 steps: long enough to kill its worker after the first chunk
        f"lora_long,{zoo}/base,,{lora},a photo of sks,2,,16,4",
        f"lora_peft,{zoo}/base,,{zoo}/lora_peft,a photo of sks,2,train,8,",
        f"db_uncond,{zoo}/base,{zoo}/dreambooth,,,2,,8,",
        f"broken,{zoo}/base,,broken.safetensors,a photo of sks,2,,8,",
        f"missing,{zoo}/base,,nowhere.safetensors,a photo of sks,2,,8,",
        f"twice,{zoo}/base,,{lora},a photo of sks,2,,8,",
        f"twice,{zoo}/base,,{zoo}/lora_kohya.safetensors,a photo of sks,2,,8,",
        f"no_n0,{zoo}/base,,{lora},a photo of sks,,,8,",
    ]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def _rows(summary: dict) -> dict:
    return {(row["id"], row["line"]): row for row in summary["rows"]}


def _by_id(summary: dict) -> dict:
    return {row["id"]: row for row in summary["rows"] if row["id"] != "twice"}


def _chunk_times(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("*/generation/chunk_*.npz"))}


# --- the manifest ---


def test_manifest_rows_and_row_errors(inputs):
    entries = read_manifest(inputs / "manifest.csv")
    assert [e.id for e in entries] == list(COMPUTED) + ["broken", "missing", "twice", "twice", "no_n0"]
    assert [e.line for e in entries] == list(range(2, 10))  # line 1 is the header
    rows = {e.id: e for e in entries if isinstance(e, Row)}
    errors = {(e.id, e.line): e.error for e in entries if isinstance(e, RowError)}
    assert set(rows) == {*COMPUTED, "broken"}  # a broken file is found only when it loads
    assert Path(rows["lora_peft"].train) == (inputs / "train").resolve()  # relative to the manifest's folder
    assert Path(rows["lora_long"].base).is_absolute() and rows["lora_long"].steps == 4
    assert rows["lora_peft"].steps is None and rows["lora_peft"].num_images == 8
    assert rows["db_uncond"].caption == "" and rows["db_uncond"].method == "finextract-uncond"  # Eq. 6
    assert "lora 'nowhere.safetensors': no such file or folder" in errors[("missing", 6)]
    assert errors[("twice", 7)] == errors[("twice", 8)]  # both rows fail: neither may own OUT/twice/
    assert "id 'twice' is used by the rows on lines 7, 8" in errors[("twice", 7)]
    assert errors[("no_n0", 9)] == "missing field 'n0'"


def test_manifest_base_auto_chooses_from_the_bases_folder(tmp_path, tiny_zoo):
    """`base: auto` with `bases`: each row's base is chosen when the manifest is read (`choose_base`);
    a row nothing decides for is a RowError naming the candidates, and the other rows stand."""
    from safetensors.torch import load_file, save_file

    from finextract.fleet.summary import row_entry
    from finextract.zoo.models import save_pipeline, tiny_components

    bases = tmp_path / "bases"
    bases.mkdir()
    (bases / "parent").symlink_to(tiny_zoo / "base")
    save_pipeline(tiny_components(1, tokenizer_folder=bases / "seed1" / "tokenizer"), bases / "seed1")
    named = tmp_path / "named.safetensors"  # the random zoo's kohya LoRA, with its parent's name recorded
    save_file(load_file(str(tiny_zoo / "lora_kohya.safetensors")), str(named), {"ss_sd_model_name": "parent"})
    lines = [
        "id,base,bases,finetuned,lora,caption,n0",
        f"db,auto,bases,{tiny_zoo}/dreambooth,,a photo of sks,2",  # nearest its parent's weights
        f"named,AUTO,bases,,{named},a photo of sks,2",  # named by its metadata
        f"tie,auto,bases,,{tiny_zoo}/lora_kohya.safetensors,a photo of sks,2",  # nothing tells them apart
        f"no_bases,auto,,,{named},a photo of sks,2",
        f"stray,{tiny_zoo}/base,bases,,{named},a photo of sks,2",
        f"not_a_folder,auto,{named},,{named},a photo of sks,2",
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    entries = {e.id: e for e in read_manifest(tmp_path / "manifest.csv")}
    for row_id in ("db", "named"):
        row = entries[row_id]
        assert isinstance(row, Row) and row.base == str(bases / "parent") and row.bases == str(bases), row
        assert [Path(c["path"]).name for c in row.base_ranking] == ["parent", "seed1"]
        fields = row_entry(row, "pending")
        assert fields["base"] == str(bases / "parent") and fields["base_ranking"] == list(row.base_ranking)
    assert entries["named"].base_ranking[0]["match"] == "ss_sd_model_name"
    db = entries["db"].base_ranking
    assert db[0]["match"] is None and db[0]["distance"] < db[1]["distance"]
    errors = {e.id: (e.line, e.error) for e in entries.values() if isinstance(e, RowError)}
    assert set(errors) == {"tie", "no_bases", "stray", "not_a_folder"}
    assert errors["tie"][0] == 4 and errors["tie"][1].startswith(
        f"base 'auto': 2 candidate bases in {bases} fit {tiny_zoo}/lora_kohya.safetensors equally (parent, seed1)"
    )
    assert errors["no_bases"][1] == "base 'auto' needs 'bases': a folder of candidate bases to choose the parent from"
    assert errors["stray"][1].startswith("bases 'bases' is read only with base 'auto'")
    assert errors["not_a_folder"][1] == f"bases {str(named)!r}: not a folder (give the folder of candidate bases)"
    # a row without bases keeps the fields (and so the resume key) of audits made before `base: auto`
    plain = Row(line=2, id="p", base="b", finetuned=None, lora="l", caption="c", n0=2)
    assert "bases" not in plain.fields() and "base_ranking" not in plain.fields()


def test_audit_row_with_base_auto_records_the_base_choice(tmp_path, tiny_zoo):
    """A `base: auto` row's result.json and report say which base was chosen, why, and the ranking,
    as an extraction given the folder of candidates does (N = 4 at 2 steps: seconds)."""
    from finextract.extract import Extractor
    from finextract.zoo.models import save_pipeline, tiny_components

    bases = tmp_path / "bases"
    bases.mkdir()
    (bases / "parent").symlink_to(tiny_zoo / "base")
    save_pipeline(tiny_components(1, tokenizer_folder=bases / "seed1" / "tokenizer"), bases / "seed1")
    (tmp_path / "m.csv").write_text(
        f"id,base,bases,finetuned,lora,caption,n0,num_images\ndb,auto,bases,{tiny_zoo}/dreambooth,,a photo of sks,2,4\n"
    )
    summary = audit(tmp_path / "m.csv", tmp_path / "out", executor="local", progress=False, **RUN)
    assert [row["status"] for row in summary["rows"]] == ["done"], summary["rows"]
    choice = json.loads((tmp_path / "out" / "db" / "result.json").read_text())["base_choice"]
    Extractor(bases, tiny_zoo / "dreambooth", device="cpu", backend="torch", threads=1).extract(
        "a photo of sks", 2, num_images=4, steps=2, out=tmp_path / "direct", progress=False
    )
    direct = json.loads((tmp_path / "direct" / "result.json").read_text())["base_choice"]
    assert choice == direct and choice["chosen"] == str(bases / "parent"), (choice, direct)
    assert choice["why"].startswith("nearest UNet weights, relative L2 distance")
    report = (tmp_path / "out" / "db" / "report.html").read_text()
    assert "<h2>Base chosen among the candidates</h2>" in report


def test_manifest_json_rows_name_their_lines(tmp_path, tiny_zoo):
    rows = [
        {"id": "a", "base": str(tiny_zoo / "base"), "lora": str(tiny_zoo / "lora"), "caption": "c", "n0": 2},
        {"id": "b", "base": str(tiny_zoo / "base"), "finetuned": str(tiny_zoo / "dreambooth"), "caption": None,
         "n0": "3", "w": 2.5, "method": "cfg"},
        {"id": "c/d", "base": str(tiny_zoo / "base"), "lora": str(tiny_zoo / "lora"), "n0": 0, "lroa": 1},
        [1, 2],
    ]  # fmt: skip
    path = tmp_path / "m.json"
    path.write_text("[\n" + ",\n".join(json.dumps(row, indent=1) for row in rows) + "\n]\n")
    a, b, c, d = read_manifest(path)
    assert isinstance(a, Row) and a.line == 2 and a.n0 == 2 and a.method == "finextract"
    # b starts after a's 7 lines; an empty caption with method cfg is refused (cfg needs the caption)
    assert isinstance(b, RowError) and b.line == 9 and "method 'cfg' needs the training caption" in b.error
    assert isinstance(c, RowError) and c.line == 9 + len(json.dumps(rows[1], indent=1).splitlines())
    for problem in (
        "unknown field(s) 'lroa'",
        "missing field 'caption'",
        "id 'c/d' cannot name a folder",
        "--n0 0: must be an integer >= 1",
    ):
        assert problem in c.error
    assert isinstance(d, RowError) and "a row must be a JSON object, not list" in d.error


def test_manifest_selection_column(tmp_path, tiny_zoo):
    base, lora = tiny_zoo / "base", tiny_zoo / "lora"
    lines = [
        "id,base,lora,caption,n0,selection",
        f"a,{base},{lora},c,2,modes",
        f"b,{base},{lora},c,2,",
        f"c,{base},{lora},c,2,big",
        f"d,{base},{lora},c,2,size",
    ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    a, b, c, d = read_manifest(tmp_path / "m.csv")
    assert a.selection == "modes" and a.spec.selection == "modes" and a.fields()["selection"] == "modes"
    # empty: the default preset's, as `extract` without --selection
    assert b.selection == PRESETS[DEFAULT_PRESET]["selection"] == b.spec.selection == b.fields()["selection"]
    assert isinstance(c, RowError) and "--selection 'big': expected one of size" in c.error
    # "size", the rule of every audit made before the column, is left out of the fields: those audits resume
    assert d.selection == "size" and d.spec.selection == "size" and "selection" not in d.fields()


def test_manifest_adaptive_column(tmp_path, tiny_zoo):
    base, lora = tiny_zoo / "base", tiny_zoo / "lora"
    lines = ["id,base,lora,caption,n0,adaptive,num_images"]
    lines += [f"{i},{base},{lora},c,2,{value}," for i, value in enumerate(("true", "Yes", "1", "", "no", "maybe"))]
    lines += [f"cap,{base},{lora},c,2,true,40"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    *flags, maybe, cap = read_manifest(tmp_path / "m.csv")
    assert [row.adaptive for row in flags] == [True, True, True, False, False]
    # adaptive: rounds of 10 x N0, N up to the paper's 50 x N0 unless given (then that is the cap)
    assert (flags[0].spec.adaptive, flags[0].spec.round_images, flags[0].spec.num_images) == (True, 20, 100)
    assert flags[0].fields()["adaptive"] is True and "adaptive" not in flags[3].fields()  # as audits before it
    assert isinstance(maybe, RowError) and "adaptive 'maybe': expected true or false" in maybe.error
    assert cap.spec.num_images == 40 and cap.spec.adaptive
    # JSON takes booleans
    (tmp_path / "m.json").write_text(json.dumps([{"id": "j", "base": str(base), "lora": str(lora), "caption": "c",
                                                  "n0": 2, "adaptive": True}]))  # fmt: skip
    (row,) = read_manifest(tmp_path / "m.json")
    assert row.adaptive and row.spec.adaptive


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("m.csv", "id,base,lroa,caption,n0\n", "line 1: unknown column(s) 'lroa'"),
        ("m.csv", 'id,base,lora,caption,n0\na,b,c,"unterminated,2\n', "line 2: not valid CSV"),
        ("m.csv", "id,base,lora,caption,n0\n\n", "no rows"),
        ("m.json", '[\n {"id": "a",\n  "n0": 2,,\n}]', "line 3: not valid JSON"),
        ("m.json", '{"id": "a"}', "expected a JSON list of row objects"),
    ],
)
def test_unparseable_manifest_is_an_error_naming_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(path)


def test_unparseable_manifest_stops_the_command_before_anything(tmp_path, capsys):
    from finextract.cli import main

    path = tmp_path / "m.csv"
    path.write_text("id,base,lroa,caption,n0\n")
    assert main(["audit", str(path), "--out", str(tmp_path / "out"), "--executor", "local"]) == 1
    assert "line 1: unknown column(s) 'lroa'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_audit_where_every_row_fails_exits_1_naming_the_shared_cause_once(tmp_path, tiny_zoo, caplog):
    from finextract.cli import main

    (tmp_path / "broken.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    rows = [f"{i},{tiny_zoo}/base,,broken.safetensors,a photo of sks,2" for i in ("a", "b", "c")]
    (tmp_path / "m.csv").write_text("id,base,finetuned,lora,caption,n0\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    with caplog.at_level("ERROR", logger="finextract"):
        assert main(["audit", str(tmp_path / "m.csv"), "--out", str(out), "--executor", "local", "--no-progress"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    errors = {row["error"] for row in summary["rows"]}
    assert len(errors) == 1 and "git-lfs pointer" in next(iter(errors))
    final = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(final) == 1 and final[0].startswith("every row failed with: ") and next(iter(errors)) in final[0]


def test_common_failure_only_when_every_row_failed():
    from finextract.fleet.summary import common_failure

    failed = [{"status": "failed", "error": e} for e in ("x", "y", "x")]
    assert common_failure(failed) == (2, "x")
    assert common_failure(failed + [{"status": "done", "error": None}]) is None
    assert common_failure([]) is None


def test_audit_help_lists_the_options(capsys):
    from finextract.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--executor", "--ray-address", "--workers", "--retries", "--threads", "--sscd"):
        assert option in text


# --- scheduling (no Ray needed) ---


def test_plan_workers_requests_gpus_or_threads():
    from finextract.fleet.executors import plan_workers

    # CPUs: each worker holds `threads` CPUs, as many as fit, never more than the rows
    assert plan_workers({"CPU": 2.0}, {"threads": 1}, None, 5) == (2, {"num_cpus": 1}, 1)
    assert plan_workers({"CPU": 8.0}, {"threads": 2}, None, 3) == (3, {"num_cpus": 2}, 2)
    # GPUs: one per worker, threads default to the CPUs per GPU; device cpu uses CPUs instead
    assert plan_workers({"CPU": 16.0, "GPU": 2.0}, {"threads": None}, None, 9) == (
        2,
        {"num_gpus": 1, "num_cpus": 8},
        8,
    )
    assert plan_workers({"CPU": 4.0, "GPU": 1.0}, {"device": "cpu", "threads": 4}, None, 9) == (1, {"num_cpus": 4}, 4)
    with pytest.raises(ValueError, match="--workers 3: the Ray cluster holds 2 worker"):
        plan_workers({"CPU": 2.0}, {"threads": 1}, 3, 5)


def test_workers_keep_their_base():
    from finextract.fleet.executors import _next_base, by_base

    def row(i, base):
        return Row(line=i, id=f"r{i}", base=base, finetuned=None, lora="l", caption="c", n0=1)

    queue = by_base([(row(i, base), {}) for i, base in enumerate("AAABBA")])
    assert list(queue) == ["A", "B"] and len(queue["A"]) == 4
    holds = {}
    assert _next_base(queue, holds, 0) == "A"  # most rows left
    holds[0] = "A"
    assert _next_base(queue, holds, 1) == "B"  # a base no other worker holds
    holds[1] = "B"
    queue["B"].clear()
    assert _next_base(queue, holds, 1) == "A"  # nothing left of its own: help with A
    assert _next_base(queue, holds, 0) == "A"


# --- a base loaded once, paired with many checkpoints ---


def test_pairs_on_a_loaded_base_equal_pairs_loaded_from_disk(tiny_zoo):
    from finextract.engine.loading import load_base, load_model_pair
    from finextract.engine.lora import lora_gate_of

    base = load_base(tiny_zoo / "base")
    for checkpoint in ({"lora": tiny_zoo / "lora_peft"}, {"lora": tiny_zoo / "lora_kohya.safetensors"},
                       {"finetuned": tiny_zoo / "dreambooth"}):  # fmt: skip
        reused, fresh = load_model_pair(base, **checkpoint), load_model_pair(tiny_zoo / "base", **checkpoint)
        # every weight byte, the adapters and the structure hash the same; the sources read the same
        assert reused.fingerprint == fresh.fingerprint and reused.sources == fresh.sources
        for mine, theirs in zip(reused.base_unet.parameters(), base.parts["unet"].parameters()):
            assert mine.data_ptr() == theirs.data_ptr()  # the weights are shared, not copied
        assert lora_gate_of(base.parts["unet"]) is None  # the LoRA hooks went on the pair's own modules
        assert (reused.base_unet is base.parts["unet"]) == (reused.kind == "dreambooth")


# --- end to end: local executor ---


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_local")
    return out, audit(inputs / "manifest.csv", out, executor="local", progress=False, **RUN)


def test_local_audit_summary(local_run):
    out, summary = local_run
    rows = _by_id(summary)
    assert [rows[i]["status"] for i in COMPUTED] == ["done"] * 3
    assert all(row["status"] == "failed" and row["error"] for row in summary["rows"] if row["id"] in FAILING)
    assert "git-lfs pointer" in rows["broken"]["error"]
    assert summary["audit"]["counts"] == {
        "done": 3,
        "skipped": 0,
        "failed": 5,
        "running": 0,
        "interrupted": 0,
        "pending": 0,
    }
    # one worker: the base is loaded once, by the first row, and kept for the other four
    assert summary["audit"]["base_loads"] == 1
    assert [rows[i]["base_loaded"] for i in (*COMPUTED, "broken")] == [True, False, False, False]
    lora_peft = rows["lora_peft"]
    assert 0 <= lora_peft["AS"] <= 1 and lora_peft["A-ESR0.6"] in (0.0, 0.5, 1.0)  # 2 training images
    assert rows["lora_long"]["AS"] is None and rows["lora_long"]["num_images"] == 16 and rows["lora_long"]["steps"] == 4
    assert rows["db_uncond"]["kind"] == "dreambooth" and rows["db_uncond"]["method"] == "finextract-uncond"
    for row_id in COMPUTED:
        row, record = rows[row_id], json.loads((out / row_id / "result.json").read_text())
        assert row["threshold"] == record["threshold"] and row["clique_sizes"] == record["clique_sizes"]
        assert row["largest_clique"] == max(record["clique_sizes"]) and len(row["extracted"]) == 2
        assert all((out / path).is_file() for path in row["extracted"]) and (out / row["report"]).is_file()
        # the evidence: each input file's path, size and sha256, as the row's result.json records them
        assert row["inputs"] == record["evidence"]["inputs"] and row["inputs"][0]["role"] == "base"
        checkpoint = row["inputs"][1]  # the row's fine-tune or adapter, at its manifest path
        assert checkpoint["role"] == record["config"]["models"]["kind"].replace("dreambooth", "finetuned")
        assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in checkpoint["files"])
    assert summary["audit"]["command"]["call"]["function"] == "finextract.audit"
    assert summary["audit"]["environment"]["python"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    table = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [(r["id"], int(r["line"]), r["status"]) for r in table] == [
        (r["id"], r["line"], r["status"]) for r in summary["rows"]
    ]
    assert table[1]["AS"] == f"{lora_peft['AS']:.4g}" and table[1]["clique_sizes"] == " ".join(
        map(str, lora_peft["clique_sizes"])
    )


def test_local_audit_images_equal_a_fresh_load(local_run, tiny_zoo):
    # the fleet pairs each LoRA with a base loaded once; a pair loaded from disk gives the same images
    from finextract.engine.config import RunConfig
    from finextract.engine.loading import load_model_pair
    from finextract.generation import generate
    from finextract.spec import preset_guidance_w, preset_run_options

    out, _ = local_run
    config = RunConfig.resolve(**preset_run_options(None, **RUN))  # the audit's: the default preset's scheduler
    pair = load_model_pair(tiny_zoo / "base", lora=tiny_zoo / "lora_peft").place(config)
    w = preset_guidance_w(None, "finextract", pair.kind)  # and its w
    images = generate(pair, "a photo of sks", 8, w=w, config=config, progress=False).images.numpy()
    chunks = sorted((out / "lora_peft" / "generation").glob("chunk_*.npz"))
    assert np.array_equal(np.concatenate([np.load(chunk)["images"] for chunk in chunks]), images)


def test_index_page_links_every_report_sorted_by_as(local_run):
    out, summary = local_run
    page = (out / "index.html").read_text()
    for row_id in COMPUTED:
        assert f'<a href="{row_id}/report.html">{row_id}</a>' in page
        for path in _by_id(summary)[row_id]["extracted"]:
            assert f'src="{path}"' in page
    assert "git-lfs pointer" in page and "sortRows('clique')" in page and "sortRows('as')" in page
    # rows with AS first (descending), then the others by manifest line
    order = [page.index(f'data-line="{row["line"]}"') for row in summary["rows"]]
    lines = [row["line"] for _, row in sorted(zip(order, summary["rows"]))]
    assert lines[0] == _by_id(summary)["lora_peft"]["line"] and lines[1:] == sorted(lines[1:])


def test_local_rerun_regenerates_nothing(local_run, inputs):
    out, first = local_run
    chunks = _chunk_times(out)
    assert len(chunks) == 4 + 2 + 2  # lora_long: 16 images in chunks of 4; the others 8
    again = audit(inputs / "manifest.csv", out, executor="local", progress=False, **RUN)
    rows = _by_id(again)
    assert [rows[i]["status"] for i in COMPUTED] == ["skipped"] * 3
    assert rows["broken"]["status"] == "failed"  # retried: it may have been fixed
    assert _chunk_times(out) == chunks
    for row_id in COMPUTED:  # a skipped row reads as it was computed
        for name in ("AS", "threshold", "clique_sizes", "extracted", "timings"):
            assert rows[row_id][name] == _by_id(first)[row_id][name]
    # another setting that changes the images makes the rows run again, and the row folders refuse it
    # (before loading a model: the run's record names its settings; --overwrite would replace them)
    changed = audit(inputs / "manifest.csv", out, executor="local", progress=False, **{**RUN, "seed": 1})
    error = _by_id(changed)["lora_peft"]["error"]
    assert "holds another run (there -> now: seed: 0 -> 1)" in error and "--overwrite" in error
    assert _chunk_times(out) == chunks


# --- end to end: Ray, 2 workers, a worker killed in the middle of a row ---


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # the CI machine: 2 cores, 24 GB; a small object store (rows pass only file paths and summaries)
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    yield ray
    ray.shutdown()


class _Killer(threading.Thread):
    """Kills (SIGKILL) the process writing OUT/<row>/generation once its first chunk is finished: its file
    on disk and marked done in the manifest (written just after the file; a kill between the two leaves
    a chunk that a resume rightly recomputes)."""

    def __init__(self, out: Path, row_id: str):
        super().__init__(daemon=True)
        self.folder = out / row_id / "generation"
        self.killed_pid, self.first_chunk, self.stop = None, None, False

    def run(self):
        chunk, lock = self.folder / "chunk_00000.npz", self.folder / ".lock"
        while not self.stop and self.killed_pid is None:
            if chunk.is_file() and finished_count(self.folder) >= 1 and lock.is_file() and lock.read_text().strip():
                pid = int(lock.read_text())
                if pid != os.getpid():
                    self.first_chunk = chunk.stat().st_mtime_ns
                    os.kill(pid, signal.SIGKILL)
                    self.killed_pid = pid
            time.sleep(0.005)


@pytest.fixture(scope="module")
def ray_run(ray_cluster, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_ray")
    killer = _Killer(out, "lora_long")
    killer.start()
    try:
        summary = audit(inputs / "manifest.csv", out, workers=2, retries=2, progress=False, **RUN)
    finally:
        killer.stop = True
    return out, summary, killer


def test_ray_audit_writes_what_the_local_executor_writes(ray_run, local_run):
    (out, summary, _), (local_out, local) = ray_run, local_run
    assert summary["audit"]["executor"] == "ray" and summary["audit"]["workers"] == 2
    assert [(r["id"], r["status"]) for r in summary["rows"]] == [(r["id"], r["status"]) for r in local["rows"]]
    for row_id in COMPUTED:
        ours, theirs = _by_id(summary)[row_id], _by_id(local)[row_id]
        for name in ("AS", "A-ESR0.6", "A-ESR0.7", "threshold", "clique_sizes", "extracted", "kind", "w", "k"):
            assert ours[name] == theirs[name], (row_id, name)
        for path in ours["extracted"]:  # the same images, byte for byte
            assert (out / path).read_bytes() == (local_out / path).read_bytes()
        ours_record = json.loads((out / row_id / "result.json").read_text())
        theirs_record = json.loads((local_out / row_id / "result.json").read_text())
        assert ours_record["cliques"] == theirs_record["cliques"]


def test_ray_worker_killed_mid_row_is_retried_from_its_chunks(ray_run):
    out, summary, killer = ray_run
    assert killer.killed_pid is not None, "the long row finished before its worker could be killed"
    row = _by_id(summary)["lora_long"]
    assert row["status"] == "done"
    assert not row["worker"].endswith(f":{killer.killed_pid}")  # the retry ran in Ray's restarted worker
    assert row["chunks_resumed"] >= 1  # it found the chunks the killed worker finished
    assert (out / "lora_long" / "generation" / "chunk_00000.npz").stat().st_mtime_ns == killer.first_chunk
    manifest = json.loads((out / "lora_long" / "generation" / "manifest.json").read_text())
    assert [c["status"] for c in manifest["chunks"]] == ["done"] * 4


def test_ray_workers_load_each_base_once(ray_run):
    _, summary, _ = ray_run
    ran = [r for r in summary["rows"] if r["worker"]]  # every row a worker attempted (broken included)
    workers = {r["worker"] for r in ran}
    # every worker process loaded the base once, for its first row, and kept it for the others
    assert summary["audit"]["base_loads"] == len(workers) < len(ran)
    for worker in workers:
        assert sum(r["base_loaded"] for r in ran if r["worker"] == worker) == 1


def test_ray_rerun_starts_no_worker(ray_run, inputs):
    out, _, _ = ray_run
    chunks = _chunk_times(out)
    complete = inputs / "complete.csv"  # the finished rows only (same ids and fields: same configuration)
    lines = (inputs / "manifest.csv").read_text().splitlines()
    complete.write_text("\n".join(lines[:4]) + "\n")
    again = audit(complete, out, workers=2, progress=False, **RUN)
    assert [r["status"] for r in again["rows"]] == ["skipped"] * 3
    assert again["audit"]["workers"] == 0 and again["audit"]["base_loads"] == 0
    assert _chunk_times(out) == chunks


# --- Ctrl-C ---


def test_ctrl_c_keeps_finished_work_and_the_rerun_resumes(tiny_zoo, tmp_path, caplog, monkeypatch):
    from finextract import generation as generation_module
    from finextract.cli import main
    from finextract.store import chunks

    out, manifest = tmp_path / "audit", tmp_path / "m.csv"
    manifest.write_text(
        "id,base,finetuned,lora,caption,n0,num_images,steps\n"
        f"db_uncond,{tiny_zoo / 'base'},{tiny_zoo / 'dreambooth'},,,2,8,\n"
        f"long,{tiny_zoo / 'base'},,{tiny_zoo / 'lora_peft'},a photo of sks,2,16,4\n"
    )
    generation = out / "long" / "generation"
    write_manifest = chunks.write_manifest

    def write_then_press_ctrl_c(folder, contents):
        # SIGINT, as a terminal's Ctrl-C sends, once the long row's first chunk is in its manifest. Sent
        # from the main thread, so Python's handler raises KeyboardInterrupt at the next bytecode, at a
        # point a real Ctrl-C can land; a thread polling the folder instead raced the whole (0.3 s) row
        # on a loaded machine and sometimes lost.
        write_manifest(folder, contents)
        if Path(folder) == generation and finished_count(generation) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(generation_module.chunks, "write_manifest", write_then_press_ctrl_c)
    command = ["audit", str(manifest), "--out", str(out), "--executor", "local", "--backend", "torch"]
    command += ["--device", "cpu", "--threads", "1", "--batch-size", "4", "--steps", "2", "--no-progress"]
    assert main(command) == 130
    monkeypatch.undo()
    assert "rerun the same command to continue" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["id"], r["status"]) for r in summary["rows"]] == [("db_uncond", "done"), ("long", "interrupted")]
    assert summary["audit"]["interrupted"] is True
    again = audit(manifest, out, executor="local", progress=False, **RUN)
    assert [r["status"] for r in again["rows"]] == ["skipped", "done"]
    assert _by_id(again)["long"]["chunks_resumed"] >= 1


def test_ray_missing_is_a_clear_error(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'finextract\[fleet\]'"):
        audit(inputs / "manifest.csv", tmp_path / "out", progress=False, **RUN)


def test_index_images_are_the_extracted_pngs(local_run):
    out, summary = local_run
    row = _by_id(summary)["lora_peft"]
    images = [np.asarray(Image.open(out / path)) for path in row["extracted"]]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in images)
