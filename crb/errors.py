"""The one error family: a single line a user can act on; the CLI prints it without a traceback."""


class CrbError(Exception):
    """A user-facing error. ``str(err)`` is one line: where, what, expected vs got."""


class RecipeError(CrbError):
    """A recipe is malformed: bad TOML, unknown key, wrong type, impossible value."""


class DataError(CrbError):
    """A data file or record is malformed."""
