"""The one error type of attribution graphs: bad input, said in one paragraph with the fix."""


class GraphError(ValueError):
    """A replacement model or graph that cannot be built as asked."""
