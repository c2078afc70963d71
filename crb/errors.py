"""The one error family: a single line a user can act on; the CLI prints it without a traceback."""


class CrbError(Exception):
    """A user-facing error. ``str(err)`` is one line: where, what, expected vs got."""

    exit_code = 2
    label = "error"

    def one_line(self) -> str:
        """The message with control characters (a newline in a user's key, say) escaped."""
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(self))


class RecipeError(CrbError):
    """A recipe is malformed: bad TOML, unknown key, wrong type, impossible value."""


class DataError(CrbError):
    """A data file or record is malformed."""


class Stopped(CrbError):
    """Training stopped on SIGTERM/SIGINT after finishing the step and writing a checkpoint."""

    label = "stopped"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # as a shell reports a signal


class CrbWarning(UserWarning):
    """Something a user should know that does not stop the run; printed as one line, `crb: warning: ...`."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (the libraries' messages run to several lines)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
