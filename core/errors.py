"""Exceptions raised by tokenmill. Each message names what is wrong and what would be right."""


class TokenmillError(Exception):
    """Base class of tokenmill's own errors."""


class ConfigError(TokenmillError, ValueError):
    """An engine option is unknown, deprecated or out of range."""


class PluginLoadError(TokenmillError):
    """A plugin failed to import or to register its components."""


class RegistrationError(TokenmillError, ValueError):
    """A component class does not meet its contract, or its name is taken."""


class UnknownComponentError(TokenmillError, KeyError):
    """No registered component of that kind has that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RefusedComponentError(TokenmillError, ValueError):
    """The component exists but the registry refused it (for example V0-only)."""
