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
