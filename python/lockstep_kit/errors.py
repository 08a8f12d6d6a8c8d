"""The kit's one exception type."""


class KitError(ValueError):
    """A dump that does not fit the golden (name, step, shape, dtype) or a file that cannot be used.

    The message names the tap (or file), what was expected and what was found, and a hint when the
    mismatch looks like a known layout mistake.
    """
