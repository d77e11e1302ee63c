"""Imports of optional dependencies, with errors that name the pip extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency of this package is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming ``pip install 'retrv-r1-plugin[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module!r} is needed for this feature; install it with: "
            f"pip install 'retrv-r1-plugin[{extra}]'"
        ) from exc
