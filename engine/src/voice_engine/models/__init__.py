"""The model side of the engine: loading local model directories and the batched steppers.

``loading`` opens a model directory through moshi's own loaders (offline); ``asr`` holds the batched
speech-to-text stepper (:class:`voice_engine.models.asr.AsrStepper`).
"""
