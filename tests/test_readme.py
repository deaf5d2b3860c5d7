"""The README's and the docs' examples run as written, and their links resolve.

- Every command line of every ```bash block of README.md and docs/*.md (`finextract ...`,
  `python build_engines.py ...`, with or without leading `VAR=value` settings) parses with the CLI's
  own parser as pasted: no `[--option]` or `a|b` placeholders, every option exists, every value is
  valid. A bash array (`S=(...)`) is expanded where `"${S[@]}"` uses it.
- docs/usage.md's command-line block then runs in a fresh folder as written and in order (each line
  uses what the one before wrote), with small counts appended (argparse keeps the last value:
  `--num-images 8 --steps 2 --backend torch`, `finetune --steps 2`). The README's command lines are
  lines of that block, so they run too. `demo`, `bench`, `sweep`, `audit` and `build_engines.py`
  (TensorRT) only parse; `make demo` and their own tests run them.
- The README's Python example and docs/usage.md's Python block run, in that order, in one fresh folder
  (the second resumes the first's generation: the same extraction).
- Every relative link (and its `#anchor`) of README.md and docs/*.md resolves; the README is at most
  15 KB; the paper is cited by its authors.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
#: appended to a command that runs: small counts, so the chain takes seconds, and the torch backend
#: (the exported backends' five ONNX exports would double its time; tests/test_export.py and the
#: backend tests cover them)
SMALL = {
    "extract": ["--num-images", "8", "--steps", "2", "--backend", "torch"],
    "generate": ["--num-images", "8", "--steps", "2", "--backend", "torch", "--no-progress"],
    "cluster": [],
    "evaluate": [],
    "verify": ["--images", "1"],
    "finetune": ["--steps", "2"],
    "zoo": [],
    "env": [],
}


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def _command_lines(blocks: list[str]) -> list[str]:
    """Command lines of shell blocks: continuations joined, trailing comments and leading `VAR=value`
    settings dropped, bash arrays (`S=(...)`, used as `"${S[@]}"`) expanded."""
    lines = []
    for block in blocks:
        arrays = {}
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if array := re.fullmatch(r"(\w+)=\((.*)\)", line):
                arrays[array.group(1)] = array.group(2)
                continue
            for name, words in arrays.items():
                line = line.replace(f'"${{{name}[@]}}"', words)
            line = re.sub(r"^(?:\w+=[^\s$()]*\s+)+", "", line)
            if line.startswith(("finextract ", "python build_engines.py ")):
                lines.append(line)
    return lines


def _parser_for(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The top-level parser of a command line, and the words it parses."""
    if words[:2] == ["python", "build_engines.py"]:
        import importlib.util

        spec = importlib.util.spec_from_file_location("build_engines", ROOT / "build_engines.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser(), words[2:]
    from finextract.cli import build_parser

    return build_parser(), words[1:]


LINES = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in _command_lines(_blocks(page, "bash"))]
#: docs/usage.md's command-line block, run in order; the other examples (the demo, caption recovery,
#: sweeps, audits: minutes each) are parsed above and run by their own tests (test_quality,
#: test_caption, test_sweep, test_fleet)
USAGE_LINES = _command_lines(re.findall(r"## Command line\n\n```bash\n(.*?)```", USAGE.read_text(), re.S))


@pytest.mark.parametrize("page, line", LINES, ids=[f"{page}: {' '.join(line.split()[:3])}" for page, line in LINES])
def test_command_line_parses_as_pasted(page, line, capsys):
    words = shlex.split(line)
    assert not re.search(r"\[-", line), f"{page}: optional settings in brackets: {line}"
    assert not any("|" in word for word in words), f"{page}: alternatives a|b in a command: {line}"
    parser, rest = _parser_for(words)
    try:
        parser.parse_args(rest)
    except SystemExit as error:
        pytest.fail(f"{page}: {line}\n{capsys.readouterr().err}" if error.code else f"{page}: {line} exits")


def _runnable(line: str, zoo: Path) -> list[str] | None:
    """The line as the shell would pass it (`$ZOO` and `"$(cat FILE)"` expanded, in the current
    folder), small counts appended; None for a parse-only command."""
    line = line.replace("$ZOO", str(zoo))
    line = re.sub(r'"\$\(cat ([^)]+)\)"', lambda m: shlex.quote(Path(m.group(1)).read_text().strip()), line)
    words = shlex.split(line)
    if words[0] != "finextract" or words[1] not in SMALL:
        return None
    return words[1:] + SMALL[words[1]]


def test_usage_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from finextract.cli import main
    from finextract.zoo.trained import default_zoo_folder

    monkeypatch.chdir(tmp_path)
    ran = []
    for line in USAGE_LINES:
        words = _runnable(line, default_zoo_folder())
        if words is None:
            continue
        assert main(words) == 0, f"docs/usage.md line failed: {line}\n{capsys.readouterr().err}"
        ran.append(" ".join(words[:2]))
    assert {"extract --base", "generate --base", "cluster --images", "evaluate --extracted", "verify run/"} <= set(ran)
    assert {"finetune --base", "zoo build", "env", "env --json"} <= set(ran)
    assert (tmp_path / "run" / "result.json").is_file() and (tmp_path / "clusters" / "result.json").is_file()
    command = json.loads((tmp_path / "run" / "result.json").read_text())["evidence"]["command"]
    assert command["source"] == "cli" and command["argv"][:3] == ["finextract", "extract", "--base"]
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "ft").is_dir() and (tmp_path / "ft_lora").is_dir()
    assert (tmp_path / "gen_sdxl" / "manifest.json").is_file() and (tmp_path / "gen_v" / "manifest.json").is_file()


def test_readme_commands_are_usage_commands():
    """The README's command lines are lines of the usage block, so the test above runs them."""
    readme = _command_lines(_blocks(README, "bash"))
    assert readme and set(readme) <= set(USAGE_LINES)


def test_python_examples_run_as_written(tmp_path, monkeypatch):
    (quick,) = [b for b in _blocks(README, "python") if "from finextract import" in b]
    (full,) = [b for b in _blocks(USAGE, "python") if "from finextract import" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(quick, str(README), "exec"), namespace)
    assert namespace["result"].images.shape[0] == 5 and "AS" in namespace["result"].metrics
    namespace = {}
    exec(compile(full, str(USAGE), "exec"), namespace)
    result, clusters = namespace["result"], namespace["clusters"]
    assert result.images.shape[0] == 5 and set(result.metrics) >= {"AS", "A-ESR0.6", "A-ESR0.7"}
    assert len(clusters.cliques) == 2 and namespace["images"].shape[0] == 16
    assert (tmp_path / "api_run" / "result.json").is_file() and (tmp_path / "api_gen").is_dir()


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link} -> {target} does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: link {link}: no heading #{anchor} in {target.name}"


def test_readme_is_short_and_cites_the_paper():
    assert README.stat().st_size <= 15_000, f"README.md is {README.stat().st_size} bytes: move depth to docs/"
    for path in [*PAGES, ROOT / "finextract" / "__init__.py"]:
        assert "Wang et al" not in path.read_text(), f"{path.name}: the paper is Wu, Zhang & Wu"
    assert "Wu, Zhang & Wu" in README.read_text() and "PMLR 267:68060-68077" in README.read_text()


def test_docs_have_their_examples():
    assert len(LINES) >= 30 and len(USAGE_LINES) >= 20
    assert {page for page, _ in LINES} >= {"README.md", "docs/usage.md", "docs/blind-audits.md", "docs/fleets.md"}
