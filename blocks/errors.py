"""Exceptions of the blocks package.

Every failure a caller can cause (a bad checkpoint, a block range outside the model, a tensor
of the wrong shape) raises a subclass of `BlocksError` with a message that names what was
expected and what was found, so the daemon can send it back to the peer verbatim.
"""


class BlocksError(Exception):
    """Base class of every error raised on purpose by `blocks`."""


class UnsupportedArchitecture(BlocksError):
    """The checkpoint's model type or one of its options is not implemented here."""


class MissingTensor(BlocksError):
    """A tensor the model needs is absent from the checkpoint."""


class CheckpointError(BlocksError):
    """The checkpoint directory is unreadable: no config.json, no safetensors, a bad index."""


class BlockRangeError(BlocksError):
    """A block interval lies outside the model or outside the loaded span."""


class InputError(BlocksError):
    """A tensor or argument passed in has the wrong rank, size, dtype or value."""
