"""Human-friendly numbers: what is accepted, and what is refused because it is ambiguous or not finite."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmc.spec.numbers import parse_human_number


@given(st.integers(min_value=0, max_value=10**15))
def test_thousands_separators_round_trip(n):
    # Python's own formatter is the independent source of the "1,234,567" spelling.
    assert parse_human_number(f"{n:,}") == float(n)
    assert parse_human_number(f"{n:_}") == float(n)


@pytest.mark.parametrize("text", ["15,6T", "1,23", "12,34,567", "1,2345"])
def test_decimal_comma_is_refused_not_dropped(text):
    with pytest.raises(ValueError, match="commas are only thousands separators"):
        parse_human_number(text)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "1e400", "1e400T", "-1e999"])
def test_non_finite_is_refused(value):
    with pytest.raises(ValueError, match="finite"):
        parse_human_number(value)


@pytest.mark.parametrize("value", [True, False, ".inf", ".nan", "lots"])
def test_not_numbers(value):
    with pytest.raises(ValueError):
        parse_human_number(value)
