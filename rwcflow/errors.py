"""Errors that reach the user as one clear line (file and problem), never a traceback."""


class RwcflowError(Exception):
    """Base class of every error rwcflow reports to the user."""


class InputError(RwcflowError):
    """An input file is missing, unreadable or unsuitable; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        # rebuilt from its two parts, so that it crosses process boundaries (Pydra's workers) intact
        return type(self), (self.path, self.problem)


class ModelFileError(InputError):
    """A model file is corrupt, of another format version, or does not match the network."""
