"""Silence the one import-time notice that is not the user's problem.

transformers (5.x) announces, on every import of an SD pipeline, that its CLIP and SigLIP image
processors fall back to their PIL versions because torchvision is missing. The toolkit never uses
those processors (no safety checker), and torchvision is deliberately not installed (it breaks
beside the CPU torch build), so the notice reads like a real problem and is none. Only that
message is dropped; every other transformers warning still prints.
"""

from __future__ import annotations

import logging

_FALLBACK = "requires torchvision (not installed); falling back to"


class _TorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _FALLBACK not in record.getMessage()


def silence_torchvision_fallback() -> None:
    """Install the filter on the transformers logger that emits the notice (idempotent)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallback) for f in logger.filters):
        logger.addFilter(_TorchvisionFallback())
