"""The error every layer may raise for a bad setting (the model room, the methods, the configuration)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field and the reason."""
