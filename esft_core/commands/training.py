"""Placeholder command group; filled in by its issue."""


def register(sub) -> None:  # noqa: D103 - nothing registered yet
    return None
