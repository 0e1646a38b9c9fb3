"""voice-engine: Kyutai's streaming speech models, served in batches over their websocket protocols."""

__version__ = "0.1.0"
