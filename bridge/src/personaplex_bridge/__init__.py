"""PersonaPlex websocket bridge: browser voice page <-> MAS orchestrator, Moshi pool and streaming TTS."""

__version__ = "0.1.0"
