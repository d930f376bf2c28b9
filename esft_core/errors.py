"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero (no traceback)."""

import math


class EsftError(ValueError):
    """Bad input or an impossible request. The message is a complete one-line explanation for the user."""


def fail(msg: str) -> None:
    """Raise an EsftError with `msg` (helper so call sites read as guards)."""
    raise EsftError(msg)


MAX_MESSAGE = 600  # characters of one error line; longer ones are cut (a message never grows with the input)


def brief(items, n: int = 8) -> str:
    """The first `n` of `items`, comma-separated, then 'and N more': list-valued parts of an error line stay short
    whatever the input (an expert config with 10^6 ids once made a 7.9 MB line)."""
    items = list(items)
    head = ", ".join(map(str, items[:n]))
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def bounded(msg: str, limit: int = MAX_MESSAGE) -> str:
    """`msg` cut to `limit` characters (the last resort of the CLI for messages built from user input)."""
    return msg if len(msg) <= limit else f"{msg[:limit]}… ({len(msg) - limit} more characters)"


DAMAGE_WORDS = ("could not read enough bytes", "corrupt", "checksum", "invalid block", "failed to read")


def damaged_db_message(e: BaseException, db) -> str | None:
    """The one-line explanation for a DuckDB error that means the trace database file is damaged (truncated by a
    full disk or an interrupted copy, bit rot), or None for any other error. Read-only: nothing is written."""
    import sys

    duckdb = sys.modules.get("duckdb")  # only loaded if a command touched the DB; never imported for this
    if duckdb is None or not isinstance(e, duckdb.Error):
        return None
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not any(w in first.lower() for w in DAMAGE_WORDS):
        return None
    where = f"trace database {db}" if db else "the trace database"
    return bounded(f"{where} is damaged ({first.removeprefix('IO Error: ')}); restore it from a backup, or build a "
                   "new one with `esft import` from an export (`esft export`) or by recording again")


def finite(value: float, flag: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite float within [low, high] (open ends when asked); the error names the accepted range."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise EsftError(f"{flag} must be a finite number in {rng}, got {value}")
    return float(value)
