"""What the command line prints besides its results: one-line user errors and only our own logs.

Kept import-light (no torch, no transformers): `hotswap` must answer a typo in well under a second.
"""
from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that speak at the chosen --log-level. uvicorn configures its own loggers (startup and
# access lines) from the same --log-level; everything else is a library and speaks from WARNING.
OWN_LOGGERS = ("server", "hotswap", "adapters_store", "kernels", "loadtests")
# Libraries whose WARNINGs are advice, not problems ("Token indices sequence length is longer than
# ...": the server enforces its own limits). They install their own handler when first imported,
# at the level named by an environment variable, so that variable is what silences them.
ADVISORY_LIBRARIES = {"transformers": "TRANSFORMERS_VERBOSITY", "huggingface_hub": "HF_HUB_VERBOSITY"}


class CliError(Exception):
    """A user-caused problem (a missing path, an unreachable server, a refused key): the command line
    prints its message as one line, `hotswap: error: <message>`, and exits 1 — never a traceback.
    The message says what went wrong and what to do."""


def setup_logging(level: str = "info") -> None:
    """Log our own loggers at `level` ("debug", "info", ...); third-party libraries only from WARNING
    (httpx's "HTTP Request: ..." lines, filelock, urllib3 are INFO/DEBUG chatter), and the advisory
    libraries only from ERROR. `--log-level debug` lets everything through."""
    numeric = getattr(logging, level.upper())
    debug = numeric <= logging.DEBUG
    logging.basicConfig(level=numeric if debug else max(numeric, logging.WARNING), format=LOG_FORMAT)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    if debug:
        return
    for library, env in ADVISORY_LIBRARIES.items():
        if env in os.environ:  # the user chose this library's verbosity
            continue
        os.environ[env] = "error"  # read when the library is first imported
        logging.getLogger(library).setLevel(logging.ERROR)  # in case it already was
