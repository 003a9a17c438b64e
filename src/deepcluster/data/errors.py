"""The data package's one error type (a module of its own, so that every module of the
package can raise it without importing the data sources)."""


class DataError(ValueError):
    """A data set cannot be used as asked; the message says why and what to do."""
