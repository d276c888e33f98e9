"""The one error a checkpoint loader raises: what is wrong with the file and how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or describes something lmforge cannot build."""
