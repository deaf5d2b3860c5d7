"""The `finextract` command line.

Each subcommand lives in its own module under `finextract/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it.
Modules are imported only to build the parser; heavy libraries are imported inside `func`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

# subcommand module names, in the order `--help` lists them
COMMANDS = (
    "extract",
    "generate",
    "cluster",
    "evaluate",
    "verify",
    "inspect",
    "sweep",
    "audit",
    "finetune",
    "zoo",
    "bench",
    "demo",
    "env",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finextract",
        description="Extract the fine-tuning images of a personalized diffusion model (FineXtract).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"finextract.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"finextract.commands.{name}":
                raise
            continue  # command not built yet
        module.register(subparsers)
    return parser


class _NoOpCastWarning(logging.Filter):
    """Drops diffusers' "modules ... that should be kept in float32: []" warning: with an empty list the
    cast keeps nothing in float32, so it warns about nothing. Any non-empty list still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


class _TorchvisionNotice(logging.Filter):
    """Drops transformers' "... requires torchvision" notices: finextract uses no transformers image
    processor, so a missing torchvision changes nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lower()
        return not ("torchvision" in message and "requires" in message)


# transformers loggers that report optional vision backends (filters act on the logger a record is logged to)
_TORCHVISION_LOGGERS = (
    "transformers",
    "transformers.utils.import_utils",
    "transformers.image_utils",
    "transformers.image_processing_backends",
    "transformers.image_processing_utils",
    "transformers.models.auto.image_processing_auto",
)


def quiet_libraries() -> None:
    """Hide third-party noise a CLI user sees on every run, keeping real warnings.

    Hugging Face progress bars ("Loading weights", "Loading pipeline components"; our own tqdm bars
    stay) unless HF_HUB_DISABLE_PROGRESS_BARS is set otherwise, diffusers' empty fp32-modules
    warning, and transformers' "requires torchvision" notices. Called by `main` only: the library itself changes no global logging.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # read at import time; catch up if already imported
        sys.modules["transformers"].utils.logging.disable_progress_bar()

    warnings.filterwarnings("ignore", message=r"(?is).*requires.*torchvision")
    for name in _TORCHVISION_LOGGERS:
        library_logger = logging.getLogger(name)
        if not any(isinstance(f, _TorchvisionNotice) for f in library_logger.filters):
            library_logger.addFilter(_TorchvisionNotice())
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _NoOpCastWarning) for f in diffusers_logger.filters):
        diffusers_logger.addFilter(_NoOpCastWarning())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # lazy: `import finextract.cli` (and `finextract --help`) loads only argparse
    from finextract.evidence import command_line

    try:
        with command_line(["finextract", *(sys.argv[1:] if argv is None else argv)]):  # for the records
            return args.func(args) or 0
    except (ValueError, OSError, RuntimeError) as error:  # OSError: FileNotFoundError, NotADirectoryError, ...
        # Library code raises; only the CLI turns errors into a message and an exit code.
        logging.getLogger("finextract").debug("traceback", exc_info=True)
        message = str(error)
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message += f" ({error.filename})"
        print(f"finextract {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
