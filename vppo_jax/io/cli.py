"""Command-line glue: the conversion scripts' error handling, and flag parsing for the absl programs."""

import sys
from typing import Callable

from absl import flags

from vppo_jax.io.hub import HubLookupError
from vppo_jax.io.safetensors_files import CheckpointError


def run_conversion(convert: Callable[[], None], out: str) -> int:
    """Runs `convert`; bad input (a malformed checkpoint, an existing output, a model that is
    neither a path nor a Hub name) becomes one error line and exit status 1 (no traceback)."""
    try:
        convert()
    except (CheckpointError, FileExistsError, HubLookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
    sys.exit(2)
