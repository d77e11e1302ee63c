"""JSON-lines reading shared by the CLI and the training data readers.

One reader, so a corpus file for ``retrv-r1 index`` and a BEIR file for ``retrv-r1 eval``
accept the same encodings (UTF-8, a leading BOM dropped) and fail with the same
file-and-line errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and line."""


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else ``FileNotFoundError`` naming ``what`` and the path."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def decode_error(path: Path, exc: UnicodeDecodeError) -> DataFormatError:
    """A :class:`DataFormatError` naming the first line of ``path`` that is not valid UTF-8."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as line_exc:
                return DataFormatError(f"{path}:{lineno}: not valid UTF-8 ({line_exc.reason} at byte {line_exc.start + 1})")
    return DataFormatError(f"{path}: not valid UTF-8 ({exc.reason})")


def read_jsonl(path: PathLike, what: str = "JSON-lines file") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file.

    UTF-8 whatever the locale, a leading BOM dropped. A line that is not JSON, not a JSON
    object or not UTF-8 raises :class:`DataFormatError` naming the file and line.
    """
    p = require_file(Path(path), what)
    with open(p, encoding="utf-8-sig") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:  # without the newline: a line cut short is reported where it ends, not at column 1
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    what = exc.msg.removesuffix(" at")  # "Unterminated string starting at" + our "at column"
                    raise DataFormatError(f"{p}:{lineno}: invalid JSON ({what} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataFormatError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError as exc:
            raise decode_error(p, exc) from None
