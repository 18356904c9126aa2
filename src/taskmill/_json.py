"""JSON checks for what taskmill stores: params, checkpoints, results, text."""

from __future__ import annotations

import json
from typing import Any

from taskmill.exceptions import PayloadTooLarge


def clean_text(text: str) -> str:
    """Escape unpaired surrogates, which no database or JSON response can encode.

    ``os.fsdecode()`` makes them of file names that are not UTF-8; other text
    is returned unchanged.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def to_json_value(
    value: Any,
    label: str,
    *,
    max_bytes: int | None = None,
    too_large: type[PayloadTooLarge] = PayloadTooLarge,
) -> Any:
    """Return a copy of ``value`` as JSON stores it; raise TypeError if it cannot be.

    The copy keeps later changes to ``value`` (by a task's ``post()``, say)
    out of what is stored. Raises ``too_large`` if the JSON is longer than
    ``max_bytes``: the size is that of the compact JSON (no space after ``,``
    or ``:``) in UTF-8, with non-ASCII characters unescaped. The value is
    encoded in full before it is measured.
    """
    try:
        text = json.dumps(
            value, allow_nan=False, ensure_ascii=False, separators=(",", ":")
        )
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(
            f"{label} contains text with an unpaired surrogate ({exc.reason}); "
            "decode bytes with errors='backslashreplace' instead of os.fsdecode()"
        ) from exc
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{label} must be JSON-serializable: {exc}") from exc
    if max_bytes is not None and len(encoded) > max_bytes:
        raise too_large(label, len(encoded), max_bytes)
    return json.loads(text)
