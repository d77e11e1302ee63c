"""Turning transformers' own progress bars off for a block, and back on after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hub_progress(enabled: bool) -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") only when
    ``enabled``; restored afterwards, since the caller may live in a longer process (a
    notebook, a test session, a training run that logs to a file)."""
    from transformers.utils import logging as hf_logging

    turn_off = not enabled and hf_logging.is_progress_bar_enabled()
    if turn_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()
