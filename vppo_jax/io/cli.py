"""Command-line glue: flag parsing for the absl programs, and the exit statuses they end with.

Exit statuses (the same in every program that runs its `main` through `run_program`):

    0   done
    1   an unexpected error (a bug, or a failure of the machine): the traceback is printed
    2   bad input that stops the program at start-up (config, reward, data, model, a workdir
        another run holds): one line naming the problem and the fix, no traceback
    3   the training run stopped itself: its policy collapsed (vppo_jax/trainer/collapse_guard.py)
    4   a checkpoint could not be written (disk full, permissions): the run stopped at once
    75  preempted (SIGTERM, SIGINT): the last finished step is checkpointed; rerun the same command

An error that stops a program on purpose carries its status as `exit_status` (and may name the
word before its line as `line_prefix`, "error" by default); bad input is `InputError`, or one of
the older types that mean the same (STARTUP_ERRORS). `--debug` prints the traceback as well.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Callable

from absl import app, flags

from vppo_jax.errors import InputError
from vppo_jax.io.hub import HubLookupError
from vppo_jax.io.safetensors_files import CheckpointError

EXIT_BAD_INPUT = 2
# Bad input, whatever type the code that noticed it raises.
STARTUP_ERRORS = (InputError, CheckpointError, HubLookupError)


def exit_status(error: BaseException) -> int | None:
    """The documented exit status of an error that stops a program on purpose; None for a bug."""
    if isinstance(error, STARTUP_ERRORS):
        return EXIT_BAD_INPUT
    return getattr(error, "exit_status", None)


def run_program(main: Callable[[list[str]], int | None], flags_parser=None):
    """`absl.app.run(main)` with the exit statuses of the module docstring and a --debug flag.

    An error with a documented status is printed as one line (`error: <message>`) and the
    program exits with that status; --debug adds its traceback. Any other error propagates
    (a traceback, status 1). `flags_parser` defaults to `parse_flags`.
    """
    debug = flags.DEFINE_bool("debug", False, "Print the traceback of an error that stops the program.")

    @functools.wraps(main)
    def main_with_statuses(argv):
        try:
            return main(argv)
        except Exception as error:
            status = exit_status(error)
            if status is None:
                raise
            if debug.value:
                traceback.print_exc()
            print(f"{getattr(error, 'line_prefix', 'error')}: {error}", file=sys.stderr, flush=True)
            sys.exit(status)

    app.run(main_with_statuses, flags_parser=flags_parser or parse_flags)


def run_conversion(convert: Callable[[], None], out: str) -> int:
    """Runs `convert`; bad input (a malformed checkpoint, an existing output, a model that is
    neither a path nor a Hub name) becomes one error line and exit status 2 (no traceback)."""
    try:
        convert()
    except (*STARTUP_ERRORS, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {out}")
    return 0


def parse_flags(argv: list[str], arguments: Callable[[list[str]], list[str]] | None = None) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: a bad flag or
    `--config.<field>` override (an unknown field, a value of the wrong type) ends the program
    with one line naming it and exit status 2, not a traceback. Words that are not flags are
    refused the same way, unless `arguments(words) -> words` accepts them (it raises
    ValueError with the message otherwise): `flags_parser=functools.partial(parse_flags,
    arguments=...)`."""
    try:
        argv = flags.FLAGS(argv)
        if arguments is not None:
            return [argv[0], *arguments(argv[1:])]
        if len(argv) > 1:
            raise ValueError(f"unexpected argument(s) {' '.join(argv[1:])}; every option is a --flag")
        return argv
    except flags.Error as error:
        problem = str(error)
    except ValueError as error:
        problem = str(error)
    except (AttributeError, KeyError) as error:  # ml_collections: a --config.<field> that does not exist
        while error.args and isinstance(error.args[0], BaseException):  # it wraps a KeyError
            error = error.args[0]
        name, _, hint = str(error.args[0] if error.args else error).partition("\n")
        problem = (
            f"the config has no field {name}{'; ' + hint if hint else ''} (all fields: vppo_jax/trainer/config.py)"
        )
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
