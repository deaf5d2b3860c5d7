"""Model loading that says what it does in one log line, without the libraries' own progress bars.

transformers and diffusers draw a "Loading weights" / "Loading pipeline components" bar for every
`from_pretrained`; a pair loads up to six models, so a run printed six bars nobody asked for (through
the Python API as well as the CLI). Loading hides them for its duration, restores the libraries'
setting afterwards (no global state changes), and logs one INFO line with the seconds it took.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

logger = logging.getLogger("finextract.engine.loading")


@contextlib.contextmanager
def library_bars_hidden():
    """Disable transformers' and diffusers' progress bars inside the block; restore them after."""
    # heavy: diffusers and transformers; engine.loading imports quiet.py before it needs them
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    modules = [m for m in (transformers_logging, diffusers_logging) if m.is_progress_bar_enabled()]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in modules:
            module.enable_progress_bar()


def logged_load(what: str):
    """Decorate a loader: its library bars hidden, one INFO line when it starts and when it is done.

    `what` names the thing loaded ("model pair", "base"); the lines name the paths given (the first two
    positional arguments and `lora=`).
    """

    def decorate(load):
        @functools.wraps(load)
        def wrapper(*args, **kwargs):
            given = (*args[:2], kwargs.get("base"), kwargs.get("finetuned"), kwargs.get("lora"))
            source = " + ".join(str(path) for path in given if path is not None)
            started = time.perf_counter()
            logger.info("loading %s from %s ...", what, source)
            with library_bars_hidden():
                loaded = load(*args, **kwargs)
            logger.info("loaded %s in %.1f s", what, time.perf_counter() - started)
            return loaded

        return wrapper

    return decorate
