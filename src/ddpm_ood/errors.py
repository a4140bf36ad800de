"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or a request that cannot be honoured.

    The message must name the file or flag at fault and the problem, in one line. The CLI prints it as
    ``error: <message>`` and exits with status 2.
    """
