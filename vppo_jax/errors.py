"""The one exception type for problems with what the user gave us.

A config field, a data file, a model directory, a reward module or a storage path that is wrong
raises `InputError` (or a subclass) with a message of one line that names the problem and the
fix. The entry points print that line and exit with status 2, without a traceback (one is shown
with --debug), so a user sees what to change rather than where the code noticed it.
"""


class InputError(ValueError):
    """Bad input from outside the program: the message names the problem and the fix, in one line.

    A ValueError, so code that already refuses bad values with ValueError keeps working while its
    raises move to this type."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """`Type: message` on one line, for a message of ours that quotes an error (pyarrow's and
    TensorStore's span several lines). Beyond `limit` characters the middle gives way, since
    both ends matter: what failed comes first and the operating system's reason ("File too
    large") last."""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if limit is None or len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
