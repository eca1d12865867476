"""Errors lorakit raises for problems the user can fix.

Every error carries a message that names what is wrong and where (a file, a JSON path, a flag), so the
command line can print it as it is, without a traceback.
"""


class LorakitError(Exception):
    """Base of every user-facing lorakit error."""


class ConfigError(LorakitError):
    """The local configuration or a weights reference cannot be used."""


class InvalidIdError(LorakitError):
    """An id that is not a safe file name."""


class RecordNotFoundError(LorakitError):
    """A record that does not exist."""


class RecordError(LorakitError):
    """A record file that cannot be parsed or does not match its schema."""


class DatasetError(LorakitError):
    """A dataset that cannot be built, read or exported as asked."""
