"""Human-friendly numbers for token counts, batch sizes and dollars.

YAML 1.1 (PyYAML) reads ``1.4e+12`` and ``2_000_000`` as numbers but ``15.6e12`` and ``1e12``
(no dot or no exponent sign) as *strings*, and of course ``15.6T`` / ``16M`` too. Fields typed
:data:`HumanFloat` accept all of these.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator

#: Suffix multipliers (decimal, as in "15.6T tokens"): K=1e3, M=1e6, B/G=1e9, T=1e12.
SUFFIXES: dict[str, float] = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}

_NUM = re.compile(r"^\s*\$?\s*([+-]?(?:\d[\d_,]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)\s*([KMBGTkmbgt]?)\s*$")
#: Commas are accepted only as thousands separators in groups of three before any decimal point
#: ("2,000,000", "1,234.5"); "15,6T" (a decimal comma) is ambiguous and refused.
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?([eE][+-]?\d+)?$")
_HINT = "write e.g. 15.6e12, 15.6T, 16M, 2_000_000 or 2,000,000"


def parse_human_number(value: object) -> object:
    """Turn ``"15.6T"``, ``"16M"``, ``"15.6e12"``, ``"2_000_000"``, ``"$1.5M"`` into a float.

    Numbers pass through; anything else that is not a string is returned unchanged so that
    pydantic reports the type error. Raises ``ValueError`` for strings that are not numbers.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {value!r})")
    if isinstance(value, int | float):
        try:
            return _finite(float(value), value)
        except OverflowError:  # an int past the double range (float(10**400) raises instead of giving inf)
            raise ValueError(f"must be a finite number (got an integer of {len(str(abs(value)))} digits)") from None
    if not isinstance(value, str):
        return value
    m = _NUM.match(value)
    if not m:
        raise ValueError(f"not a number: {value!r} ({_HINT})")
    mantissa, suffix = m.groups()
    if "," in mantissa and not _THOUSANDS.match(mantissa):
        raise ValueError(f"ambiguous number {value!r}: commas are only thousands separators ({_HINT}; "
                         "use a dot for decimals)")
    try:  # Decimal: "1.1T" is exactly 1.1e12, not 1100000000000.0002
        x = Decimal(mantissa.replace("_", "").replace(",", ""))
    except InvalidOperation as e:
        raise ValueError(f"not a number: {value!r} ({_HINT})") from e
    return _finite(float(x * Decimal(int(SUFFIXES[suffix.upper()]))) if suffix else float(x), value)


def _finite(x: float, raw: object) -> float:
    """Refuse infinities and NaN (``.inf``, ``.nan`` or an overflowing ``1e400``): no plan can use them."""
    if not math.isfinite(x):
        raise ValueError(f"must be a finite number (got {raw!r})")
    return x


HumanFloat = Annotated[float, BeforeValidator(parse_human_number, json_schema_input_type=float | str)]
"""A float that also accepts ``15.6T``, ``16M``, ``15.6e12``, ``2_000_000`` (K, M, B/G, T suffixes)."""
