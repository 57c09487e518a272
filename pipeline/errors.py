"""Error types and the exit codes they map to.

Every failure the user can act on is one of these, with a one-line message that names the file,
field or value at fault. The CLI turns them into exit codes; nothing else prints tracebacks.
"""


class PipelineError(Exception):
    """Base class: a failure with a clear, one-line message."""

    exit_code = 1


class RecipeError(PipelineError):
    """Bad input: recipe, paths, model, data. Exit code 2; nothing was written."""

    exit_code = 2


class InputError(RecipeError):
    """Bad input found while running (a missing model folder, empty data, a corrupt file)."""


class StageError(PipelineError):
    """A stage failed while running. Exit code 1; its output folder was not published."""

    exit_code = 1


class OutputError(StageError):
    """The run could not write its outputs (disk full, no permission): it stops, whichever variant
    hit it, since every later stage would fail the same way."""


class ParityError(StageError):
    """ONNX outputs differ from the reference beyond the tolerance: the model is not published."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a one-line
    error built from a library's exception quotes."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
