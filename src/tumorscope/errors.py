"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (a path, a folder, a file, a value): the message says what and where."""
