"""Command-line glue shared by the conversion scripts."""
import sys
from typing import Callable

from vppo_jax.safetensors_io import CheckpointError


def run_conversion(convert: Callable[[], None], out: str) -> int:
    """Runs `convert`; bad input becomes one error line and exit status 1 (no traceback)."""
    try:
        convert()
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
