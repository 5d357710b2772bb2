"""Errors that reach the user as one line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a flag, a value, a path, a file.

    The CLI prints ``isif: error: <message>`` and exits with code 2. The
    message should name the fix.
    """
