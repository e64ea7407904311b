"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A bad data input: the message names the offending field or path and what to do.

    Subclasses ValueError so callers that validate configs generically still catch it.
    """
