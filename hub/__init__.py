"""Agent Hub: a real-time hub for security agents."""

__version__ = "0.1.0"
