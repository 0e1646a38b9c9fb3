"""The batched speech-to-text stepper: Mimi encoder + an STT LM (``dep_q = 0``), ``slots`` rows.

Each :meth:`AsrStepper.step` takes one 1920-sample float32 frame (80 ms at 24 kHz) per active slot,
encodes the frames with Mimi under a per-slot exec mask, steps ``LMGen(support_out_of_sync=True)``
under the same mask, decodes greedily (temperature 0, as Kyutai's STT servers do), and turns each
slot's text token into Kyutai's word events exactly as Kyutai's Rust server does
(``rust/moshi-core/src/asr.rs``, ``State::step_tokens``):

* the slot's own step counter ``step_idx`` goes up by one per frame;
* from ``step_idx >= asr_delay_in_tokens`` on: a PAD (3) or EPAD (0) token after word tokens ends the
  word (``Word`` with the word's tokens and ``start_time`` = the last EPAD time); any other token is a
  word token; an EPAD after an ended word gives ``EndWord`` with ``stop_time`` =
  ``(step_idx - asr_delay_in_tokens) / 12.5``, which is also the next word's start time;
* the extra heads (Kyutai's semantic VAD) give ``prs``: per head, the softmax probability of class 0.

Slots that join are reset (``reset_streaming(reset_mask)``) inside the step that first serves them,
so a session's output depends only on its own audio: on CPU in fp32 it is bit-identical whether it
runs alone or among others that join and leave.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMGen

from . import loading

log = logging.getLogger("voice_engine.models.asr")

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
FRAME_RATE = 12.5
PAD_ID = 3  # Kyutai's text padding token
EPAD_ID = 0  # end of padding: a word starts at the next token

# asr_delay_in_tokens in Kyutai's own server configurations, by the model's audio_delay_seconds
# (delayed-streams-modeling configs/config-stt-en_fr-hf.toml: 6; config-stt-en-hf.toml: 32).
KYUTAI_ASR_DELAYS = {0.5: 6, 2.5: 32}


@dataclass(frozen=True)
class AsrWord:
    text: str
    start_time: float


@dataclass(frozen=True)
class AsrOutput:
    """What one step gave one slot, in Kyutai's message order: Step, then Word, then EndWord."""

    step_idx: int  # the slot's own step count, after this step
    prs: tuple[float, ...] | None  # None: the model has no extra heads (no Step message)
    word: AsrWord | None = None
    end_word: float | None = None  # stop_time


@dataclass
class _SlotText:
    """Per-slot word state (Rust ``ItemState``)."""

    step_idx: int = 0
    word_tokens: list[int] = field(default_factory=list)
    unended_word: bool = False
    last_stop_time: float = 0.0


def asr_delay_for(stt_config: Mapping[str, Any], frame_rate: float = FRAME_RATE) -> int:
    """The text delay in steps for a model's ``stt_config``, as Kyutai's server configs set it."""
    if "asr_delay_in_tokens" in stt_config:
        return int(stt_config["asr_delay_in_tokens"])
    seconds = float(stt_config.get("audio_delay_seconds", 0.5))
    if seconds in KYUTAI_ASR_DELAYS:
        return KYUTAI_ASR_DELAYS[seconds]
    return math.floor(seconds * frame_rate)


class AsrStepper:
    """``batch.Stepper`` for the ``asr`` module: inputs are 1920-sample float32 frames."""

    def __init__(
        self,
        lm: Any,
        mimi: Any,
        tokenizer: Any,
        slots: int,
        device: torch.device,
        asr_delay_in_tokens: int,
    ) -> None:
        if lm.dep_q != 0:
            raise loading.ModelDirError(f"not an STT model: dep_q is {lm.dep_q}, an STT model has 0")
        if mimi.frame_size != FRAME_SIZE or mimi.sample_rate != SAMPLE_RATE:
            raise loading.ModelDirError(
                f"Mimi has frames of {mimi.frame_size} samples at {mimi.sample_rate} Hz; "
                f"the protocol needs {FRAME_SIZE} at {SAMPLE_RATE}"
            )
        self._slots = slots
        self.device = device
        self.lm = lm
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.asr_delay_in_tokens = asr_delay_in_tokens
        self.has_extra_heads = len(lm.extra_heads) > 0
        self.gen = LMGen(lm, use_sampling=False, temp=0.0, temp_text=0.0, support_out_of_sync=True)
        # A text token from LMGen lags its sampling step by the model's largest delay (0 for
        # Kyutai's STT models): word times are counted from the step the token belongs to.
        self.text_lag = int(self.gen.max_delay)
        self._text = [_SlotText() for _ in range(slots)]
        self._pcm = torch.zeros(slots, 1, FRAME_SIZE, dtype=torch.float32, device=device)
        with torch.no_grad():
            self.mimi.streaming_forever(slots)
            self.gen.streaming_forever(slots)

    @property
    def slots(self) -> int:
        return self._slots

    # --- construction from a model directory ---

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Any,
        slots: int,
        precision: str,
        device: str,
        asr_delay_in_tokens: int | None = None,
    ) -> AsrStepper:
        model = loading.open_model_dir(model_dir)
        dev = loading.device_of(device)
        lm = loading.load_lm(model, dev, loading.dtype_of(precision))
        mimi = loading.load_mimi(model, dev)
        tokenizer = loading.load_tokenizer(model)
        delay = asr_delay_in_tokens
        if delay is None:
            delay = asr_delay_for(model.info.stt_config, float(mimi.frame_rate))
        return cls(lm, mimi, tokenizer, slots, dev, delay)

    def warmup(self, steps: int = 2) -> None:
        """Run ``steps`` steps on silence in every slot (CUDA graphs get captured), then reset all."""
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        everyone = dict.fromkeys(range(self._slots))
        for i in range(steps):
            self.step({s: [silence] for s in range(self._slots)}, everyone if i == 0 else {})
        self._reset(list(range(self._slots)))

    # --- stepping ---

    def _mask(self, slots: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros(self._slots, dtype=torch.bool)
        if slots:
            mask[list(slots)] = True
        return mask.to(self.device)

    def _reset(self, slots: Sequence[int]) -> None:
        mask = self._mask(slots)
        with torch.no_grad():
            self.mimi.reset_streaming(mask)
            self.gen.reset_streaming(mask)
        for slot in slots:
            self._text[slot] = _SlotText()

    def step(
        self, inputs: Mapping[int, Sequence[np.ndarray[Any, Any]]], resets: Mapping[int, Any]
    ) -> Mapping[int, AsrOutput]:
        if resets:
            self._reset(sorted(resets))
        active = sorted(slot for slot, items in inputs.items() if items)
        if not active:
            return {}
        frames = np.zeros((self._slots, FRAME_SIZE), dtype=np.float32)
        for slot in active:
            frame = inputs[slot][0]
            if frame.shape != (FRAME_SIZE,):
                raise ValueError(f"slot {slot}: a frame must be {FRAME_SIZE} samples, got {frame.shape}")
            frames[slot] = frame
        mask = self._mask(active)
        with torch.no_grad():
            self._pcm.copy_(torch.from_numpy(frames)[:, None, :])
            self.mimi.set_exec_mask(mask)
            codes = self.mimi.encode(self._pcm)
            self.gen.set_exec_mask(mask)
            result = self.gen.step_with_extra_heads(codes)
            assert result is not None  # support_out_of_sync: always a result
            tokens, heads = result
            text = tokens[:, 0, 0].cpu().tolist()
            prs_rows: list[list[float]] | None = None
            if self.has_extra_heads:
                # [B, 1, dim] probabilities per head; Kyutai reports class 0 of each head.
                prs_rows = torch.stack([h[:, 0, 0] for h in heads], dim=1).float().cpu().tolist()
        return {slot: self._advance(slot, int(text[slot]), prs_rows) for slot in active}

    def _advance(self, slot: int, token: int, prs_rows: list[list[float]] | None) -> AsrOutput:
        item = self._text[slot]
        item.step_idx += 1
        prs = tuple(prs_rows[slot]) if prs_rows is not None else None
        word: AsrWord | None = None
        end_word: float | None = None
        text_step = item.step_idx - self.text_lag
        if token >= 0 and text_step >= self.asr_delay_in_tokens:
            if token in (PAD_ID, EPAD_ID):
                if item.word_tokens:
                    text = str(self.tokenizer.decode(item.word_tokens))
                    word = AsrWord(text, item.last_stop_time)
                    item.word_tokens = []
                    item.unended_word = True
            else:
                item.word_tokens.append(token)
            if token == EPAD_ID:
                stop_time = (text_step - self.asr_delay_in_tokens) / FRAME_RATE
                if item.unended_word:
                    item.unended_word = False
                    end_word = stop_time
                item.last_stop_time = stop_time
        return AsrOutput(item.step_idx, prs, word, end_word)
