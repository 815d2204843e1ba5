"""Command lines: flags checked before anything runs, and user errors reported in one line.

fire hands a misspelled flag (`--temprature 0`) back only after the function has run, so a script
would load a model and generate at the default temperature before saying so. `fire_checked`
refuses unknown flags first and names the nearest valid one.

A user error (a missing checkpoint, a bad flag value, a prompt longer than max_seq_len, a model that
does not fit) is an exception of one of the USER_ERRORS types, raised by the library with a message
that says what to do. Library callers get the exception; the example scripts (`fire_checked`) and
the `llama.*` tools (`reports_user_errors`) print its message once, as `PROG: error: MESSAGE` on
stderr, and exit with status 1, without a traceback: under torchrun only rank 0 prints (every rank
meets the same error; see `report`). Any other exception is a bug and keeps its traceback, and
LLAMA_DEBUG=1 (or `--debug`, for a tool that has the flag) shows the traceback of user errors too.
"""

import contextlib
import difflib
import functools
import inspect
import os
import sys
import time
from typing import Callable, Iterator, List, NoReturn, Optional, Sequence

import fire
import torch

from llama.checks import MissingExtra

# The exceptions that report a user's mistake. Our checks raise ValueError (a bad value: a flag, a
# prompt too long, weights that do not match their params.json), TypeError (a value of the wrong
# type: --max_seq_len abc), FileNotFoundError / NotADirectoryError / IsADirectoryError /
# FileExistsError (a path: a missing checkpoint or tokenizer, an output folder that already holds
# weights), PermissionError (an unreadable file, a gated hub model), MissingExtra (an optional
# dependency to pip install) and torch.cuda.OutOfMemoryError (a model or KV cache that does not fit:
# our checks raise it before allocating; one CUDA itself raises means the same and gets the same
# treatment). KeyError, AttributeError, RuntimeError, AssertionError and the rest are bugs.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError, MissingExtra, torch.cuda.OutOfMemoryError)
# How long a rank other than 0 waits, after a user error, for torchrun to stop it: rank 0 meets the
# same error and prints it, and torchrun then stops every other rank at once. A rank still running
# after this long met the error alone, and prints it itself.
OTHER_RANK_WAIT_S = 10.0


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
    with user_errors(os.path.basename(sys.argv[0])):
        fire.Fire(fn, command=argv)


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """Whether tracebacks of user errors are wanted: LLAMA_DEBUG set (to anything but 0, false, no,
    off or nothing), or a `--debug` flag in argv."""
    env = os.environ.get("LLAMA_DEBUG", "").strip().lower()
    return env not in ("", "0", "false", "no", "off") or "--debug" in argv


@contextlib.contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Report a user error raised inside (see USER_ERRORS) and exit with status 1; with `debug` or
    LLAMA_DEBUG=1 the exception goes on with its traceback."""
    try:
        yield
    except USER_ERRORS as e:
        if debug or debug_requested():
            raise
        report(prog, e)


def report(prog: str, error: BaseException) -> NoReturn:
    """Print `PROG: error: MESSAGE` on stderr and exit with status 1. Under torchrun (RANK and
    WORLD_SIZE set) only rank 0 prints; another rank first waits OTHER_RANK_WAIT_S for torchrun to
    stop it (as it does every rank once one has failed), and prints, naming itself, only if it was
    the only one to meet the error."""
    rank = int(os.environ.get("RANK", "0") or 0)
    message = f"{prog}: error: {str(error).strip() or type(error).__name__}"
    if rank != 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        time.sleep(OTHER_RANK_WAIT_S)
        message = f"[rank {rank}] {message}"
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def reports_user_errors(prog: str) -> Callable[[Callable], Callable]:
    """Decorate a tool's `main(argv=None)`: a user error it raises is reported by `user_errors`,
    with the traceback kept when LLAMA_DEBUG=1 or argv holds `--debug` (tools that have the flag)."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv: Optional[List[str]] = None):
            args = sys.argv[1:] if argv is None else list(argv)
            with user_errors(prog, debug="--debug" in args):
                return main(argv)

        return run

    return decorate
