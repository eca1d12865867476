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


class LeaseLost(LorakitError):
    """Another worker took over a job whose lease had run out."""


class UnreadableImageError(Exception):
    """An image file that cannot be decoded (internal: a dataset build turns it into a report line)."""


class AssetError(LorakitError):
    """An import or curation request that cannot be carried out as asked."""


class BadImage(Exception):
    """An image file that cannot be imported; the message says why."""


class TrainingError(LorakitError):
    """A training run that cannot start or cannot go on (bad config, changed images, NaN loss, ...)."""


class KohyaSetupError(TrainingError):
    """``lorakit lora setup`` failed; the message names the step and the log."""


class EvalError(LorakitError):
    """An eval or eval grid that cannot be created, rendered or read as asked."""


class GateRefusal(LorakitError):
    """A lifecycle transition that the gate does not allow (the message says which condition fails)."""


class SelectionError(LorakitError):
    """A selection policy or pick that cannot be used as given."""


class NotebookError(LorakitError):
    """A notebook run whose cell failed; ``run`` says which cell, the error, and where the files are."""

    def __init__(self, run):
        super().__init__(run.describe_failure())
        self.run = run


class WizardRefusal(LorakitError):
    """A step the wizard will not take (yet); the message says what to do instead."""
