"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or a request that cannot be honoured.

    The message must name the file or flag at fault and the problem, in one line. The CLI prints it as
    ``error: <message>`` and exits with status 2.
    """


def one_line(exc: BaseException) -> str:
    """``"<ExceptionName>: <message on one line, at most 300 characters>"``: another library's error inside ours."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}"


class ParameterError(UserError):
    """A bad value of a library parameter. The message names parameters as library callers spell them
    (``val_keep``, ``resume_epoch``); ``params`` lists those named, and the command-line boundary
    (``cli.runner.flag_message``) writes the first mention of each as the flag that sets it (``--val_keep``,
    ``--ddpm_checkpoint_epoch``)."""

    def __init__(self, message: str, *params: str) -> None:
        super().__init__(message)
        self.params = params

    def __reduce__(self):  # pickled (multiprocessing) with its parameters
        return (type(self), (str(self), *self.params))
