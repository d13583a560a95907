"""Hide the few import-time log lines of dependencies that mean nothing to a torchft user.

torchao logs ``Failed to load .../_C_mxfp8...so`` / ``_C_cutlass...so`` when its optional CUDA kernels do
not match the machine (a CPU install always), and torch 2.13 warns from ``torch.utils._pytree`` that
torchao registers an Enum as a pytree constant. Only these messages are dropped, and ``--debug``
(``TUNE_DEBUG=1``) shows them again.
"""
from __future__ import annotations

import logging
import os
import sys

# logger name -> substrings of the messages it drops
_KNOWN = {
    "torchao": ("Failed to load", "_C_"),
    "torch.utils._pytree": ("is an Enum subclass", "register_constant() on Enum subclasses is deprecated"),
}


def _debugging() -> bool:
    return "--debug" in sys.argv or os.environ.get("TUNE_DEBUG", "") not in ("", "0", "false", "False")


class _KnownNoise(logging.Filter):
    def __init__(self, markers: tuple[str, ...]):
        super().__init__()
        self.markers = markers

    def filter(self, record: logging.LogRecord) -> bool:
        if _debugging():
            return True
        message = record.getMessage()
        return not all(marker in message for marker in self.markers)


def install() -> None:
    """Attach the filters (once) to the loggers that emit the known messages."""
    for name, markers in _KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(markers))
