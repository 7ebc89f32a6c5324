"""The one exception type that the command line turns into a message instead of a traceback."""


class MapetError(Exception):
    """Bad input or a failed check, with a message that names the file or field at fault."""
