"""User-facing errors.

Every message names the offending file or value and says what to do, because the people who see
them are ComfyUI users looking at a red node, not developers reading a traceback.
"""


class NextStepError(Exception):
    """Base class: anything the user can fix by changing an input, a file or a setting."""


class CheckpointError(NextStepError):
    """A model folder or weight file is missing, incomplete or of the wrong kind."""


class SettingsError(NextStepError, ValueError):
    """A generation setting is out of range (size, cfg, steps, prompts...)."""


class InputImageError(NextStepError):
    """An input image cannot be read or used."""


class DeviceError(NextStepError):
    """The requested device or dtype is not available on this machine."""


class Cancelled(NextStepError):
    """Raised by a progress callback to stop generation between two image tokens."""
