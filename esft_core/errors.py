"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero (no traceback)."""


class EsftError(ValueError):
    """Bad input or an impossible request. The message is a complete one-line explanation for the user."""


def fail(msg: str) -> None:
    """Raise an EsftError with `msg` (helper so call sites read as guards)."""
    raise EsftError(msg)
