"""The batched text-to-speech stepper: Kyutai's DSM TTS (``kyutai/tts-*``) for many sessions at once.

Every slot is one session. A slot starts (``resets``) with its :class:`TtsParams` (voice, seed,
sampling); each :meth:`TtsStepper.step` takes, per slot, the :class:`TtsText` / :class:`TtsEos` items
that arrived since the last step. Per slot, moshi's own TTS state machine
(``moshi.models.tts.StateMachine``, ``State``, ``Entry``; words through ``script_to_entries``) decides
the text stream: the model signals when it wants the next word, the machine feeds its tokens (and the
words two ahead on the second text stream). One ``LMGen`` step runs for the whole batch with a
per-slot exec mask (``support_out_of_sync=True``), per-slot sampling (:mod:`.sampling`) and per-slot
resets; Mimi decodes per slot under its own mask.

Scheduling is the one of Kyutai's batched TTS service: a slot steps only when it has enough text to
know what comes next (the next word plus ``second_stream_ahead`` more, or ``Eos``); otherwise it waits
(``waiting`` in its output) and takes no step. So the generated audio does not depend on how the text
was split into messages or how fast it came, only on the words, the voice and the seed.

Voice conditioning is per row: the cross-attention keys and values of a joining slot (and its summed
``control``/``cfg`` condition) are computed for that slot alone and written into its row, so the
other rows never change. On the CPU in fp32 a session's output is bit-identical whether it runs
alone or among others joining and leaving (``tests/test_tts_stepper.py``).

Output per slot and step (:class:`TtsOutput`): 1920 float32 samples once audio has started (after
the model's audio delay), the words whose timing became known (Kyutai's convention: ``start_s`` is
the step the word was fed, ``stop_s`` the step the next one was, at 12.5 steps a second), and
``done`` after the last word's audio (plus ``final_padding`` steps).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from moshi.conditioners.base import ConditionAttributes
from moshi.models.tts import TokenIds, TTSModel, script_to_entries
from moshi.modules.transformer import StreamingMultiheadAttention

from .loading import device_of, dtype_of, open_model_dir
from .sampling import SamplingParams, SlotLMGen, SlotSampler

log = logging.getLogger("voice_engine.models.tts")

FRAME_SIZE = 1920


class VoiceError(ValueError):
    """A voice that cannot be used (unknown name, bad file), with the reason."""


@dataclass(frozen=True)
class TtsText:
    """Text from the client: whitespace-separated words (one message may hold one word or many)."""

    text: str


@dataclass(frozen=True)
class TtsEos:
    """The client sent all its text."""


TtsInput = Union[TtsText, TtsEos]  # noqa: UP007 - a runtime alias, Python 3.10 included


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    stop_s: float


@dataclass
class TtsOutput:
    pcm: np.ndarray[Any, np.dtype[np.float32]] | None = None  # FRAME_SIZE samples, 24 kHz
    words: list[Word] = field(default_factory=list)
    done: bool = False
    waiting: bool = False  # the slot took no step: it needs more text (or Eos)
    error: str | None = None  # why it ended early (done is then True)
    rejected: list[str] = field(default_factory=list)  # why some text could not be used (skipped)


@dataclass(frozen=True)
class Voice:
    """A loaded voice: its name and the condition attributes moshi builds from its embedding."""

    name: str
    path: Path
    attributes: Any  # moshi.conditioners.ConditionAttributes (the cfg text is set per session)


@dataclass(frozen=True)
class TtsParams:
    """A session's start parameters (what a reset applies)."""

    voice: Voice | None
    seed: int = 42
    temp: float = 0.6
    top_k: int = 250
    cfg_coef: float | None = None  # None: the module's default


@dataclass(frozen=True)
class TtsSettings:
    """Per-module settings (the module's ``options``)."""

    n_q: int | None = None  # audio codebooks generated (None: all of the model's)
    temp: float = 0.6
    top_k: int = 250
    top_k_text: int = 25
    cfg_coef: float = 2.0  # for models trained with CFG distillation (a ``cfg`` condition)
    padding_between: int = 1
    padding_bonus: float = 0.0
    max_padding: int = 8
    initial_padding: int = 2
    final_padding: int = 4
    max_steps: int = 3000  # 4 minutes of speech per session
    default_voice: str | None = None


@dataclass
class _Slot:
    state: Any  # moshi.models.tts.State
    offset: int = 0  # AR steps taken
    eos: bool = False
    fed_text: bool = False  # the first word (with the speaker token) was queued
    done: bool = False
    transcript_len: int = 0
    consumed: int = 0  # entries popped so far (len(state.consumption_times))
    open_word: tuple[str, int] | None = None  # (text, step it was fed)
    words: list[Word] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def _valid_voice_name(name: str) -> bool:
    return (
        bool(name)
        and len(name) <= 200
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and name not in (".", "..")
        and not name.startswith(".")
    )


class TtsStepper:
    """``batch.Stepper[TtsInput, TtsOutput]`` over a moshi ``TTSModel``'s pieces."""

    def __init__(self, tts_model: Any, slots: int, voices_dir: Path | None, settings: TtsSettings) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._tts = tts_model
        self._slots_n = slots
        self._settings = settings
        self.voices_dir = voices_dir
        self._voice_lock = threading.Lock()
        self._voices: dict[str, Voice] = {}
        self._cross_cache: dict[str, torch.Tensor] = {}
        lm = tts_model.lm
        self._lm = lm
        self._mimi = tts_model.mimi
        self._machine = tts_model.machine
        self._token_ids: TokenIds = self._machine.token_ids
        self.device = lm.device
        self.frame_rate = float(self._mimi.frame_rate)
        self.delay_steps = int(tts_model.delay_steps)
        if tts_model.cfg_coef != 1.0:
            raise ValueError("batch-doubling CFG is not supported (use a CFG-distilled model)")
        self.multi_speaker = bool(tts_model.multi_speaker)
        self.cfg_values = sorted(tts_model.valid_cfg_conditionings)
        if not tts_model.multistream:
            lm.dep_q = tts_model.n_q  # generate only the codebooks Mimi decodes (as TTSModel.generate)
        self.voice_suffix: str = tts_model.voice_suffix
        self._cross_attentions = [
            m for m in lm.modules() if isinstance(m, StreamingMultiheadAttention) and m.cross_attention
        ]

        self.default_voice: Voice | None = None
        condition_tensors: Any = None
        if self.multi_speaker:
            self.default_voice = self._pick_default_voice(settings.default_voice)
            attrs = self._attributes(self.default_voice, None)
            assert lm.condition_provider is not None
            condition_tensors = lm.condition_provider.prepare_and_provide([attrs] * slots)
        elif lm.condition_provider is not None:
            text: dict[str, str | None] = {"control": "ok"}
            if self.cfg_values:
                text["cfg"] = format(self._cfg(None), ".1f")
            condition_tensors = lm.condition_provider.prepare_and_provide(
                [ConditionAttributes(text=text, tensor={})] * slots
            )

        self.sampler = SlotSampler(
            slots,
            codebooks=lm.dep_q,
            card=lm.card,
            text_card=lm.text_card,
            max_top_k=max(settings.top_k, 1),
            max_top_k_text=max(settings.top_k_text, 1),
            device=self.device,
        )
        self._lm_gen = SlotLMGen(
            lm,
            self.sampler,
            temp=settings.temp,
            temp_text=settings.temp,
            top_k=settings.top_k,
            top_k_text=settings.top_k_text,
            condition_tensors=condition_tensors,
            on_text_logits_hook=self._on_text_logits,
            on_text_hook=self._on_text,
            on_audio_hook=self._on_audio,
            support_out_of_sync=True,
        )
        self.max_delay = int(self._lm_gen.max_delay)
        self._lm_gen.streaming_forever(slots)
        self._mimi.streaming_forever(slots)
        for attention in self._cross_attentions:  # fill the cached keys/values (rows are set per slot)
            gen_state = self._lm_gen._streaming_state
            assert gen_state is not None
            assert gen_state.condition_cross is not None
            attention.update_streaming_cross_attention_src(gen_state.condition_cross)
        self._input_tokens = torch.full(
            (slots, lm.n_q - lm.dep_q, 1), self._token_ids.zero, dtype=torch.long, device=self.device
        )
        self._slot_state: list[_Slot | None] = [None] * slots
        self._stepping: list[int] = []

    # --- construction ---

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        slots: int,
        device: str,
        precision: str,
        voices_dir: Path | None,
        settings: TtsSettings,
    ) -> TtsStepper:
        """Load a local ``kyutai/tts-*``-layout directory (offline) through moshi's ``TTSModel``."""
        model = open_model_dir(model_dir)
        if not model.info.tts_config or "audio_delay" not in model.info.tts_config:
            raise ValueError(f"{model_dir}/config.json: no tts_config.audio_delay (not a TTS model)")
        n_q = settings.n_q or int(model.config.get("dep_q", 0)) or 32
        tts_model = TTSModel.from_checkpoint_info(
            model.info,
            n_q=n_q,
            temp=settings.temp,
            max_padding=settings.max_padding,
            initial_padding=settings.initial_padding,
            final_padding=settings.final_padding,
            padding_bonus=settings.padding_bonus,
            device=device_of(device),
            dtype=dtype_of(precision),
        )
        return cls(tts_model, slots, voices_dir, settings)

    # --- voices ---

    def _pick_default_voice(self, configured: str | None) -> Voice:
        """The configured default voice, else the first voice (by name) that loads."""
        if self.voices_dir is None:
            raise VoiceError("this TTS model is conditioned on a voice: configure voices_dir")
        if configured:
            return self.load_voice(configured)
        names = self.voice_names()
        if not names:
            raise VoiceError(f"{self.voices_dir} holds no voice (files named <voice>{self.voice_suffix})")
        for name in names:
            try:
                return self.load_voice(name)
            except VoiceError as exc:
                log.warning("voice %s is unusable: %s", name, exc)
        raise VoiceError(f"no voice in {self.voices_dir} can be loaded")

    def voice_names(self) -> list[str]:
        if self.voices_dir is None:
            return []
        return sorted(
            p.name[: -len(self.voice_suffix)] for p in self.voices_dir.glob("*" + self.voice_suffix)
        )

    def load_voice(self, name: str) -> Voice:
        """The voice ``name`` from ``voices_dir`` (file ``name + voice_suffix``), loaded and checked.

        Names only: anything with a path separator, a leading dot or a NUL is refused. ``name`` may
        leave out the ``.wav`` that Kyutai's voice names carry. Thread-safe, cached.
        """
        if not _valid_voice_name(name):
            raise VoiceError(f"voice {name[:80]!r} is not a voice name (names only, no paths)")
        with self._voice_lock:
            cached = self._voices.get(name)
        if cached is not None:
            return cached
        if not self.multi_speaker:
            voice = Voice(name, Path(), ConditionAttributes())
        else:
            if self.voices_dir is None:
                raise VoiceError("no voices are configured (voices_dir)")
            path = None
            for candidate in (name, name + ".wav"):
                p = self.voices_dir / (candidate + self.voice_suffix)
                if p.is_file():
                    path = p
                    break
            if path is None:
                raise VoiceError(f"unknown voice {name!r}")
            try:
                attrs = self._tts.make_condition_attributes([path, path], cfg_coef=None)
            except Exception as exc:  # a broken file: safetensors, key or shape errors of all kinds
                raise VoiceError(f"voice {name!r} cannot be loaded ({type(exc).__name__})") from None
            voice = Voice(name, path, attrs)
            reference = self._voices.get(self.default_voice.name) if self.default_voice else None
            if reference is not None:
                want = reference.attributes.tensor["speaker_wavs"].tensor.shape
                got = attrs.tensor["speaker_wavs"].tensor.shape
                if want != got:
                    raise VoiceError(
                        f"voice {name!r} has an embedding of shape {tuple(got)}, not {tuple(want)}"
                    )
        with self._voice_lock:
            self._voices[name] = voice
        return voice

    def _cfg(self, requested: float | None) -> float:
        value = self._settings.cfg_coef if requested is None else requested
        if self.cfg_values and value not in self.cfg_values:
            raise VoiceError(f"cfg {value} is not one of {', '.join(str(v) for v in self.cfg_values)}")
        return value

    def _attributes(self, voice: Voice, cfg: float | None) -> Any:
        attrs = voice.attributes.copy()
        attrs.text = {"control": "ok", "cfg": format(self._cfg(cfg), ".1f") if self.cfg_values else None}
        return attrs

    def check_params(self, params: TtsParams) -> None:
        """Raise :class:`VoiceError` for parameters a reset would refuse (call before acquiring a slot)."""
        if self.multi_speaker and params.voice is None:
            raise VoiceError("a voice is required")
        self._cfg(params.cfg_coef)

    # --- Stepper protocol ---

    @property
    def slots(self) -> int:
        return self._slots_n

    @torch.no_grad()
    def step(
        self, inputs: Mapping[int, Sequence[TtsInput]], resets: Mapping[int, Any]
    ) -> Mapping[int, TtsOutput]:
        if resets:
            self._reset(resets)
        outputs: dict[int, TtsOutput] = {}
        for slot, items in inputs.items():
            state = self._slot_state[slot]
            if state is None:
                continue
            for item in items:
                self._feed(state, item)
            if state.eos and not state.fed_text and not state.done:
                state.done = True  # Eos without any text: nothing to say
                outputs[slot] = TtsOutput(done=True)
        stepping = [
            slot
            for slot in sorted(inputs)
            if (st := self._slot_state[slot]) is not None and not st.done and self._is_active(st)
        ]
        pcm = self._run(stepping) if stepping else None
        for slot in inputs:
            st = self._slot_state[slot]
            if st is None:
                continue
            if slot in outputs:
                outputs[slot].rejected, st.rejected = st.rejected, []
                continue
            rejected, st.rejected = st.rejected, []
            if st.done and slot not in stepping:
                outputs[slot] = TtsOutput(done=True, rejected=rejected)
                continue
            if slot not in stepping:
                outputs[slot] = TtsOutput(waiting=True, rejected=rejected)
                continue
            out = TtsOutput(words=st.words, rejected=rejected)
            st.words = []
            if pcm is not None and st.offset - 1 - self.max_delay >= self.delay_steps:
                out.pcm = pcm[slot].copy()
            self._check_end(st, out)
            outputs[slot] = out
        return outputs

    # --- internals ---

    def _reset(self, resets: Mapping[int, Any]) -> None:
        mask = torch.zeros(self._slots_n, dtype=torch.bool)
        gen_state = self._lm_gen._streaming_state
        assert gen_state is not None
        for slot, raw in resets.items():
            params = raw if isinstance(raw, TtsParams) else TtsParams(voice=self.default_voice)
            mask[slot] = True
            self._slot_state[slot] = _Slot(state=self._machine.new_state([]))
            temp = params.temp
            self.sampler.reset(
                slot,
                SamplingParams(
                    seed=params.seed,
                    temp=temp,
                    temp_text=temp,
                    top_k=params.top_k,
                    top_k_text=self._settings.top_k_text,
                ),
            )
            self._set_condition(slot, gen_state, params)
        mask_dev = mask.to(self.device)
        self._lm_gen.reset_streaming(reset_mask=mask_dev)
        self._mimi.reset_streaming(reset_mask=mask_dev)

    def _set_condition(self, slot: int, gen_state: Any, params: TtsParams) -> None:
        """Write ``slot``'s voice and cfg condition into its row only (computed for that row alone)."""
        lm = self._lm
        if lm.condition_provider is None or lm.fuser is None:
            return
        voice = params.voice or self.default_voice
        if self.multi_speaker and voice is not None:
            attrs = self._attributes(voice, params.cfg_coef)
        else:
            text: dict[str, str | None] = {"control": "ok"}
            if self.cfg_values:
                text["cfg"] = format(self._cfg(params.cfg_coef), ".1f")
            attrs = ConditionAttributes(text=text, tensor={})
        conditions = lm.condition_provider.prepare_and_provide([attrs])
        summed = lm.fuser.get_sum(conditions)
        if summed is not None and gen_state.condition_sum is not None:
            gen_state.condition_sum[slot] = summed[0].to(gen_state.condition_sum.dtype)
        if gen_state.condition_cross is None or voice is None:
            return
        cross = self._cross_cache.get(voice.name)
        if cross is None:
            cross = lm.fuser.get_cross(conditions)
            assert cross is not None
            cross = cross.to(device=self.device, dtype=gen_state.condition_cross.dtype)
            self._cross_cache[voice.name] = cross
        gen_state.condition_cross[slot] = cross[0]
        for attention in self._cross_attentions:
            k, v = attention._compute_cross_attention(cross, cross)
            att_state = attention._streaming_state
            assert att_state is not None
            assert att_state.k_cross is not None
            assert att_state.v_cross is not None
            att_state.k_cross[slot] = k[0]
            att_state.v_cross[slot] = v[0]

    def _feed(self, st: _Slot, item: TtsInput) -> None:
        if st.done or st.eos:
            return
        if isinstance(item, TtsEos):
            st.eos = True
            return
        try:
            entries = script_to_entries(
                self._tts.tokenizer,
                self._token_ids,
                self.frame_rate,
                [item.text],
                multi_speaker=self.multi_speaker and not st.fed_text,
                padding_between=self._settings.padding_between,
            )
        except Exception as exc:  # the tokenizer's own errors (pybind, asserts): this text only
            st.rejected.append(f"text {item.text[:40]!r} cannot be tokenized ({type(exc).__name__}): skipped")
            return
        if any(e.tokens for e in entries):
            st.fed_text = True
        st.state.entries.extend(entries)

    def _is_active(self, st: _Slot) -> bool:
        """Kyutai's rule: step when the next word and ``second_stream_ahead`` more are known (or Eos)."""
        if not st.fed_text and not st.eos:
            return False
        if st.eos:
            return True
        entries = st.state.entries
        if not entries:
            return False
        lookahead = self._machine.second_stream_ahead
        if lookahead == 0 or not entries[0].tokens:
            return True
        known = sum(1 for e in entries if e.tokens)
        return bool(known >= int(lookahead) + 1)

    def _run(self, stepping: list[int]) -> np.ndarray[Any, np.dtype[np.float32]] | None:
        exec_mask = torch.zeros(self._slots_n, dtype=torch.bool)
        exec_mask[stepping] = True
        mimi_mask = torch.zeros(self._slots_n, dtype=torch.bool)
        for slot in stepping:
            st = self._slot_state[slot]
            assert st is not None
            mimi_mask[slot] = st.offset - self.max_delay >= self.delay_steps
        self._stepping = stepping
        self.sampler.prepare(stepping)
        self._lm_gen.set_exec_mask(exec_mask.to(self.device))
        frame = self._lm_gen.step(self._input_tokens)
        assert frame is not None
        for slot in stepping:
            st = self._slot_state[slot]
            assert st is not None
            st.offset += 1
            self._track_words(st)
        if not bool(mimi_mask.any()):
            return None
        self._mimi.set_exec_mask(mimi_mask.to(self.device))
        audio = frame[:, 1 : 1 + self._lm.dep_q].clamp(min=0)
        pcm = self._mimi.decode(audio).clamp(-0.99, 0.99)
        out: np.ndarray[Any, np.dtype[np.float32]] = pcm[:, 0].float().cpu().numpy()
        return out

    def _track_words(self, st: _Slot) -> None:
        """Word timings, as Kyutai's server reports them (in this slot's steps, 12.5 per second)."""
        state = st.state
        steps = st.offset
        if len(state.consumption_times) > st.consumed and st.open_word is not None:
            text, start = st.open_word  # an entry was taken: the word before it ends here
            st.words.append(Word(text, start / self.frame_rate, steps / self.frame_rate))
            st.open_word = None
        st.consumed = len(state.consumption_times)
        if len(state.transcript) > st.transcript_len:
            text, _ = state.transcript[-1]
            st.open_word = (text, steps)
            st.transcript_len = len(state.transcript)

    def _check_end(self, st: _Slot, out: TtsOutput) -> None:
        end_step = st.state.end_step
        finished = (
            st.eos
            and end_step is not None
            and st.offset >= end_step + self.delay_steps + self._tts.final_padding + self.max_delay
        )
        if not finished and st.offset >= self._settings.max_steps:
            out.error = f"the text is too long: it reached the limit of {self._settings.max_steps} steps"
            finished = True
        if finished:
            if st.open_word is not None:
                text, start = st.open_word
                out.words.append(Word(text, start / self.frame_rate, st.offset / self.frame_rate))
                st.open_word = None
            st.done = True
            out.done = True

    # --- hooks (run inside LMGen.step, on the worker thread) ---

    def _on_text_logits(self, text_logits: torch.Tensor) -> None:
        if self._settings.padding_bonus:
            text_logits[..., self._token_ids.pad] += self._settings.padding_bonus

    def _on_text(self, text_tokens: torch.Tensor) -> None:
        tokens = text_tokens.tolist()
        for slot in self._stepping:
            st = self._slot_state[slot]
            assert st is not None
            tokens[slot], _ = self._machine.process(st.offset, st.state, tokens[slot])
        text_tokens[:] = torch.tensor(tokens, dtype=torch.long, device=text_tokens.device)

    def _on_audio(self, audio_tokens: torch.Tensor) -> None:
        # Audio is delayed by delay_steps on top of the acoustic delays: zero ("nothing") before that.
        gen_state = self._lm_gen._streaming_state
        assert gen_state is not None
        delays = self._lm_gen.delays_cuda[1 : 1 + self._lm.dep_q]
        mask = gen_state.offsets[:, None] < delays + self.delay_steps
        audio_tokens.masked_fill_(mask, self._token_ids.zero)
