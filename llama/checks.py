"""Checks of user-given values shared by every entry point: one place says what an integer is."""


def is_int(value) -> bool:
    """True for a Python int that is not a bool (True is an int to Python, never to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` if it is an integer >= minimum; otherwise a ValueError naming `name`."""
    if not is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


class MissingExtra(ImportError):
    """An optional dependency a feature needs is not installed; the message names the pip extra."""
