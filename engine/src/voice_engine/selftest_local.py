"""``voice-engine selftest --say --config CONFIG``: the chat (and asr) module loaded in this process.

See :mod:`voice_engine.selftest` for the command. Torch and the model code are imported only here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from .config import EngineConfig, ModuleConfig
from .selftest_report import FRAME, SENTENCES, TAIL_FRAMES, Spoken, tiny_of_dim


def module_of(cfg: EngineConfig, kind: str, name: str | None) -> ModuleConfig | None:
    for module in cfg.modules:
        if module.kind == kind and (name is None or module.name == name):
            return module
    return None


def speak_all(
    chat_cfg: ModuleConfig, seed: int, sentences: tuple[str, ...] = SENTENCES
) -> tuple[list[Spoken], bool]:
    """Every sentence under every pacing policy; also whether the model is a tiny test model."""
    from .models import say  # noqa: PLC0415 - torch only for this command
    from .modules.chat import ChatModule  # noqa: PLC0415

    module = ChatModule(dataclasses.replace(chat_cfg, slots=1))
    module.load()
    stepper = module.stepper
    assert stepper is not None
    tiny = tiny_of_dim(int(stepper.lm.dim))
    silence = np.zeros(FRAME, dtype=np.float32)
    results: list[Spoken] = []
    opts = module.options
    for policy in say.PACINGS:
        config = say.SayConfig(
            pacing=policy,
            after="hold",
            max_pads=opts.say_max_pads,
            frames_per_word=opts.say_frames_per_word,
            tail_frames=opts.say_tail_frames,
            barge_in_frames=0,
        )
        for index, sentence in enumerate(sentences):
            params = module.default_params(seed + index, config)
            resets: dict[int, Any] = {0: params}
            while stepper.prefilling(0) or resets:
                stepper.step({0: []} if params.prefill is not None else {}, resets)
                resets = {}
            item = stepper.say_tokens.prepare(sentence, index + 1, opts.say_max_chars)
            stepper.say(0, params, say.Say(item))
            tokens = sum(len(w.tokens) for w in item.words)
            limit = 8 + len(item.words) * (opts.say_max_pads + 2 * opts.say_frames_per_word + 2) + tokens
            pcm: list[np.ndarray[Any, Any]] = []
            reason: str | None = None
            compute = 0.0
            steps = 0
            tail = TAIL_FRAMES
            while tail > 0 and steps < limit + TAIL_FRAMES:
                started = time.perf_counter()
                out = stepper.step({0: [silence]}, {})[0]
                compute += time.perf_counter() - started
                steps += 1
                if out.pcm is not None:
                    pcm.append(out.pcm)
                for event in out.events:
                    if event["type"] == "say_end":
                        reason = str(event["reason"])
                if reason is not None:
                    tail -= 1
            audio = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
            results.append(
                Spoken(policy, index, sentence, item.text, item.dropped, reason, audio, steps, compute)
            )
    return results, tiny


def transcribe_local(asr_cfg: ModuleConfig, clips: list[np.ndarray[Any, Any]]) -> list[str]:
    from .modules.asr import AsrModule  # noqa: PLC0415

    module = AsrModule(dataclasses.replace(asr_cfg, slots=1))
    module.load()
    stepper = module.stepper
    texts = []
    for pcm in clips:
        frames = [pcm[i : i + FRAME] for i in range(0, pcm.shape[0] - FRAME + 1, FRAME)]
        frames += [np.zeros(FRAME, dtype=np.float32)] * (module.asr_delay_in_tokens + 4)
        words: list[str] = []
        resets: dict[int, Any] = {0: None}
        for frame in frames:
            out = stepper.step({0: [np.ascontiguousarray(frame, dtype=np.float32)]}, resets)
            resets = {}
            got = out.get(0)
            if got is not None and got.word is not None:
                words.append(got.word.text)
        texts.append(" ".join(words))
    return texts
