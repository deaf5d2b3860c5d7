"""The README's examples run as written.

- Its Python block is executed in a fresh folder.
- Its command lines (`finextract ...`, `python build_engines.py ...`) are checked against the CLI's
  own parsers: every option exists for that command, and every `a|b|c` lists valid choices.
- The usage section's commands (zoo build, extract, generate, cluster, evaluate, finetune) then run
  in a fresh folder as written and in order (each uses what the one before wrote), the optional `[...]`
  groups left out, with small counts appended (argparse keeps the last value: `--num-images 8
  --steps 2 --backend torch`, `finetune --steps 2`).
  `demo`, `bench` and `build_engines.py` (TensorRT) are parsed only; `make demo` runs them in CI.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
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
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _command_lines(blocks: list[str]) -> list[str]:
    """Command lines of shell blocks: continuations joined, trailing comments dropped."""
    lines = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line.startswith(("finextract ", "python build_engines.py ")):
                lines.append(line)
    return lines


def _parser_for(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser a command line addresses, and the words after its command names."""
    if words[:2] == ["python", "build_engines.py"]:
        import importlib.util

        spec = importlib.util.spec_from_file_location("build_engines", README.parent / "build_engines.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser(), words[2:]
    from finextract.cli import build_parser

    parser, rest = build_parser(), words[1:]
    while rest:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not commands or rest[0] not in commands[0].choices:
            break
        parser, rest = commands[0].choices[rest[0]], rest[1:]
    return parser, rest


LINES = _command_lines(_blocks("bash"))
#: the usage section's block, run in order; the other sections' examples (the demo, caption recovery:
#: minutes each) are option-checked above and run by their own tests (test_quality, test_caption)
USAGE_LINES = _command_lines(re.findall(r"### Command line\n\n```bash\n(.*?)```", README.read_text(), re.S))


@pytest.mark.parametrize("line", LINES, ids=[" ".join(line.split()[:3]) for line in LINES])
def test_command_line_options_exist(line):
    parser, words = _parser_for(shlex.split(line.replace("[", " ").replace("]", " ")))
    options = {option: action for action in parser._actions for option in action.option_strings}
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        assert word in options, f"README: {parser.prog} has no option {word} ({line})"
        choices = options[word].choices
        value = words[i + 1] if i + 1 < len(words) else ""
        if choices and "|" in value:
            assert set(value.split("|")) <= set(choices), f"README: {parser.prog} {word} {value}: not {choices}"


def _runnable(line: str, zoo: Path) -> list[str] | None:
    """The line as the shell would pass it (`$ZOO` and `"$(cat FILE)"` expanded, in the current
    folder), optional groups removed, first alternatives taken, small counts appended; None for a
    parse-only command."""
    line = re.sub(r"\[[^\[\]]*\]", " ", line).replace("$ZOO", str(zoo))
    line = re.sub(r'"\$\(cat ([^)]+)\)"', lambda m: shlex.quote(Path(m.group(1)).read_text().strip()), line)
    words = [w.split("|")[0] for w in shlex.split(line)]
    if words[0] != "finextract" or words[1] not in SMALL:
        return None
    return words[1:] + SMALL[words[1]]


def test_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from finextract.cli import main
    from finextract.zoo.trained import default_zoo_folder

    monkeypatch.chdir(tmp_path)
    ran = []
    for line in USAGE_LINES:
        words = _runnable(line, default_zoo_folder())
        if words is None:
            continue
        assert main(words) == 0, f"README line failed: {line}\n{capsys.readouterr().err}"
        ran.append(" ".join(words[:2]))
    assert {"extract --base", "generate --base", "cluster --images", "evaluate --extracted", "verify run/"} <= set(ran)
    assert {"finetune --base", "zoo build"} <= set(ran)
    assert (tmp_path / "run" / "result.json").is_file() and (tmp_path / "clusters" / "result.json").is_file()
    command = json.loads((tmp_path / "run" / "result.json").read_text())["evidence"]["command"]
    assert command["source"] == "cli" and command["argv"][:3] == ["finextract", "extract", "--base"]
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "ft").is_dir()
    assert (tmp_path / "gen_sdxl" / "manifest.json").is_file() and (tmp_path / "gen_v" / "manifest.json").is_file()


def test_python_block_runs_as_written(tmp_path, monkeypatch):
    (block,) = [b for b in _blocks("python") if "from finextract import" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    result, clusters = namespace["result"], namespace["clusters"]
    assert result.images.shape[0] == 5 and set(result.metrics) >= {"AS", "A-ESR0.6", "A-ESR0.7"}
    assert len(clusters.cliques) == 2 and namespace["images"].shape[0] == 16
    assert (tmp_path / "api_run" / "result.json").is_file() and (tmp_path / "api_gen").is_dir()


def test_readme_has_its_examples():
    assert len(LINES) >= 10 and any("from finextract import" in b for b in _blocks("python"))
