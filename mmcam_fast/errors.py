"""The project's error types: one clear message naming the file, line or flag at fault."""


class MMCamError(Exception):
    """Base class of every error mmcam_fast raises on bad input."""


class DataError(MMCamError):
    """A data set, metadata file, image or score map is missing, malformed or inconsistent."""


class ConfigError(MMCamError):
    """A flag, preset or config value is unknown or out of range."""


class RunFailed(MMCamError):
    """A training process that a study started ended with an error (its log names it)."""
