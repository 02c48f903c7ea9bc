"""Reading small JSON files (passports, plans, transforms) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CTPassportError, InputError


def read_json_object(path: str | Path, what: str, *, error: type[CTPassportError] = InputError,
                     hint: str | None = None) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; ``error`` (one line naming the file and ``what`` it should be) when
    it is missing, not JSON, or not an object."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} is missing", p, hint)
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the JSON
        obj = json.loads(p.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, a number over Python's
        # 4300-digit limit (ValueError), arrays nested too deep (RecursionError)
        where = f" at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        detail = "" if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)) else f": {str(exc)[:80]}"
        raise error(f"{what} is not valid JSON ({type(exc).__name__}{where}{detail})", p) from None
    if not isinstance(obj, dict):
        raise error(f"{what} must hold a JSON object", p)
    return obj
