"""UserError: bad input a user can fix (a wrong path, a malformed file, an out-of-range option).

The CLI prints these as one line and exits 2; the HTTP server turns them into 4xx responses.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and what to do."""
