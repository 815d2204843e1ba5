"""Command lines built with fire (the example scripts): flags checked before anything runs.

fire hands a misspelled flag (`--temprature 0`) back only after the function has run, so a script
would load a model and generate at the default temperature before saying so. `fire_checked`
refuses unknown flags first and names the nearest valid one.
"""

import difflib
import inspect
import sys
from typing import Callable, List, Optional

import fire


def unknown_flag(fn: Callable, argv: List[str]) -> Optional[str]:
    """A message for the first `--flag` in argv that `fn` does not take (None if all are known).
    Everything after a bare `--` belongs to fire itself (`-- --help`)."""
    names = set(inspect.signature(fn).parameters)
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in names or (name.startswith("no") and name[2:] in names) or name in ("help", "helpfull"):
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        return f"unknown flag --{name}{hint} (flags: {', '.join('--' + n for n in inspect.signature(fn).parameters)})"
    return None


def fire_checked(fn: Callable, argv: Optional[List[str]] = None) -> None:
    """fire.Fire(fn), after refusing unknown flags (exit status 2, before anything runs)."""
    argv = sys.argv[1:] if argv is None else argv
    problem = unknown_flag(fn, argv)
    if problem:
        print(f"{sys.argv[0]}: {problem}", file=sys.stderr)
        sys.exit(2)
    fire.Fire(fn, command=argv)
