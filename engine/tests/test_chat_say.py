"""The say channel (``models/say.py``): forcing a reply's words into the model's text stream.

In process on the tiny Moshi- and PersonaPlex-shaped sets (CPU, fp32), then through real engine
processes (``0x02`` text in, ``0x04`` say events out), and ``voice-engine selftest --say`` end to end.
The tiny tokenizer knows lower-case letters only: capitals and punctuation are out of its vocabulary.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import sphn
import torch

from asr_helpers import stt_model_dir
from chat_helpers import FRAME, chat_module, tiny_chat_dir, url, user_frames
from conftest import EngineProcess, start_engine
from voice_engine.config import ConfigError
from voice_engine.models import chat_prompt, say
from voice_engine.models.chat import ChatOutput, ChatParams, ChatStepper
from voice_engine.models.sampling import SamplingParams
from voice_engine.modules.chat import parse_options

SLOTS = 3
TEXT = "hello moshi this is a tiny model for tests"
SILENCE = np.zeros(FRAME, dtype=np.float32)


def sampling(seed: int = 7) -> SamplingParams:
    return SamplingParams(seed=seed, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)


@pytest.fixture(scope="module")
def stepper(models_root: Path) -> ChatStepper:
    torch.set_num_threads(1)
    return ChatStepper.from_model_dir(tiny_chat_dir(models_root, "moshi"), SLOTS, "fp32", "cpu")


@pytest.fixture(scope="module")
def pp_stepper(models_root: Path) -> ChatStepper:
    return ChatStepper.from_model_dir(tiny_chat_dir(models_root, "personaplex"), 2, "fp32", "cpu")


@pytest.fixture(scope="module")
def pp_dir_voice(models_root: Path, pp_stepper: ChatStepper) -> chat_prompt.Voice:
    path = tiny_chat_dir(models_root, "personaplex") / "voices" / "TINYF0.pt"
    return chat_prompt.load_voice_pt(path, pp_stepper.layout)


def run(
    st: ChatStepper,
    slot: int,
    params: ChatParams,
    frames: list[np.ndarray],
    commands: dict[int, list[say.Command]] | None = None,
) -> list[ChatOutput]:
    """One conversation alone in ``slot``: ``commands[i]`` are sent before step ``i``."""
    st.warmup(1)
    outs = []
    for i, frame in enumerate(frames):
        for cmd in (commands or {}).get(i, []):
            st.say(slot, params, cmd)
        outs.append(st.step({slot: [frame]}, {slot: params} if i == 0 else {})[slot])
    return outs


def events(outs: list[ChatOutput]) -> list[dict[str, Any]]:
    return [e for o in outs for e in o.events]


def said(st: ChatStepper, text: str, reply_id: int = 1) -> say.Say:
    return say.Say(st.say_tokens.prepare(text, reply_id, 2000))


def same(a: list[ChatOutput], b: list[ChatOutput]) -> bool:
    return len(a) == len(b) and all(
        x.text == y.text
        and (x.pcm is None) == (y.pcm is None)
        and (x.pcm is None or np.array_equal(x.pcm, y.pcm))
        for x, y in zip(a, b, strict=True)
    )


# --- in process ---


@pytest.mark.parametrize("pacing", say.PACINGS)
def test_forced_text_comes_out_in_order_with_audio_every_step(stepper: ChatStepper, pacing: str) -> None:
    params = ChatParams(sampling(), say=say.SayConfig(pacing=pacing, after="hold"))
    outs = run(stepper, 0, params, [SILENCE] * 90, {2: [said(stepper, TEXT)]})
    assert all(o.pcm is not None and o.pcm.shape == (FRAME,) for o in outs[1:])  # audio every step
    # Speaker-only: the only text is the forced one, in order (PAD and EPAD are not text pieces).
    assert "".join(o.text or "" for o in outs).strip() == TEXT
    evs = events(outs)
    assert evs[0] == {"type": "say_start", "id": 1, "text": TEXT, "words": 9, "dropped": ""}
    words = [e for e in evs if e["type"] == "say_word"]
    assert [w["index"] for w in words] == list(range(9)) and " ".join(w["word"] for w in words) == TEXT
    assert evs[-1] == {"type": "say_end", "id": 1, "spoken": TEXT, "reason": "done"}


def test_fixed_pacing_spaces_the_onsets(stepper: ChatStepper) -> None:
    config = say.SayConfig(pacing="fixed", after="hold", frames_per_word=6)
    params = ChatParams(sampling(), say=config)
    outs = run(stepper, 0, params, [SILENCE] * 60, {0: [said(stepper, "one two three")]})
    onsets = [i for i, o in enumerate(outs) for e in o.events if e["type"] == "say_word"]
    assert len(onsets) == 3 and onsets[1] - onsets[0] == 6 and onsets[2] - onsets[1] == 6


def test_constrained_guard_forces_the_next_word(stepper: ChatStepper) -> None:
    config = say.SayConfig(pacing="constrained", after="hold", max_pads=0)  # no PAD allowed at all
    params = ChatParams(sampling(), say=config)
    outs = run(stepper, 0, params, [SILENCE] * 40, {0: [said(stepper, "one two three")]})
    onsets = [i for i, o in enumerate(outs) for e in o.events if e["type"] == "say_word"]
    tokens = [len(w.tokens) for w in stepper.say_tokens.prepare("one two three", 1, 99).words]
    # EPAD forced, then the word's tokens, then EPAD again: onset to onset = tokens + 1.
    assert onsets[1] - onsets[0] == tokens[0] + 1 and onsets[2] - onsets[1] == tokens[1] + 1


def test_other_slots_stay_bit_identical(stepper: ChatStepper) -> None:
    """Slot 1's conversation alone, then while slot 0 says things (both policies, a cancel) and slot 2
    holds to PAD; and without the say channel at all: the same bytes."""
    frames = user_frames(3, 50)
    mine = ChatParams(sampling(11), say=say.SayConfig())
    alone = run(stepper, 1, mine, frames)
    assert same(alone, run(stepper, 1, ChatParams(sampling(11)), frames))  # channel unused: no change
    stepper.warmup(1)
    talker = ChatParams(sampling(3), say=say.SayConfig(pacing="constrained", barge_in_frames=0))
    holder = ChatParams(sampling(5), say=say.SayConfig(pacing="fixed", after="hold"))
    got = []
    for i, frame in enumerate(frames):
        resets = {1: mine, 0: talker} if i == 0 else {}
        if i == 4:
            resets[2] = holder
        if i == 1:
            stepper.say(0, talker, said(stepper, TEXT))
        if i == 5:
            stepper.say(2, holder, said(stepper, "one two three four"))
        if i == 20:
            stepper.say(0, talker, say.Cancel())
            stepper.say(0, talker, said(stepper, "the weather", 2))
        inputs = {1: [frame], 0: [SILENCE]}
        if i >= 4:
            inputs[2] = [frame]
        out = stepper.step(inputs, resets)
        got.append(out[1])
        assert out[0].pcm is not None or i == 0
    assert same(alone, got)


def test_say_beside_a_prefill_in_the_same_steps(
    pp_stepper: ChatStepper, pp_dir_voice: chat_prompt.Voice
) -> None:
    """PersonaPlex: slot 1 says a text while slot 0 runs its prefill (forced steps in the same batch);
    slot 0's conversation is the one it has alone, slot 1's text comes out exactly."""
    st = pp_stepper
    tokens = chat_prompt.text_prompt_tokens(st.tokenizer, "you are a tiny model")
    prompt = ChatParams(sampling(2), chat_prompt.build_prefill(st.layout, pp_dir_voice, tokens))
    frames = user_frames(6, 12)

    def conversation(with_talker: bool) -> tuple[list[ChatOutput], str]:
        st.warmup(1)
        talker = ChatParams(
            sampling(4), say=say.SayConfig(pacing="constrained", after="hold", barge_in_frames=0)
        )
        resets: dict[int, Any] = {0: prompt}
        if with_talker:
            resets[1] = talker
            st.say(1, talker, said(st, TEXT))
        mine: list[ChatOutput] = []
        text = ""
        for _ in range(400):
            inputs: dict[int, list[np.ndarray]] = {}
            if st.prefilling(0) or resets.get(0) is not None:
                inputs[0] = []
            elif len(mine) < len(frames):
                inputs[0] = [frames[len(mine)]]
            if with_talker:
                inputs[1] = [SILENCE]
            out = st.step(inputs, resets)
            resets = {}
            if 0 in out and not out[0].ready and 0 in inputs and inputs[0]:
                mine.append(out[0])
            if 1 in out:
                text += out[1].text or ""
            if len(mine) == len(frames) and (not with_talker or text.strip() == TEXT):
                break
        return mine, text.strip()

    alone, _ = conversation(False)
    among, text = conversation(True)
    assert text == TEXT and len(alone) == len(frames) and same(alone, among)


def test_out_of_vocabulary_characters_are_dropped_and_reported(pp_stepper: ChatStepper) -> None:
    tok = pp_stepper.say_tokens
    item = tok.prepare("Hello, wörld <system> tiny!", 4, 2000)
    assert item.text == "ello wrld tiny"
    assert sorted(item.dropped) == sorted("H,ö<system>!") and "<system>" in item.dropped
    system = pp_stepper.tokenizer.piece_to_id(chat_prompt.SYSTEM_TAG)
    for word in item.words:
        assert all(t not in (say.EPAD_ID, say.PAD_ID, system) for t in word.tokens)  # never <unk>/EPAD
    with pytest.raises(say.SayError, match="nothing to say"):
        tok.prepare("HELLO, WORLD! \u0007", 5, 2000)
    with pytest.raises(say.SayError, match="nothing to say"):
        tok.prepare("   ", 5, 2000)
    with pytest.raises(say.SayError, match="more than the limit 10"):
        tok.prepare("hello moshi", 5, 10)
    with pytest.raises(say.SayError, match="not valid UTF-8"):
        say.decode_utf8(b"hello \xff\xfe")


def test_cancel_ends_at_the_end_of_the_word_and_drops_the_queue(stepper: ChatStepper) -> None:
    params = ChatParams(sampling(), say=say.SayConfig(pacing="fixed", after="hold"))
    first = said(stepper, "weather weather weather")
    long_word = len(first.item.words[0].tokens)
    assert long_word >= 3  # the tiny vocabulary spells "weather" in pieces
    queued = said(stepper, "one two", 2)
    outs = run(stepper, 0, params, [SILENCE] * 40, {0: [first, queued]})
    onset = next(i for i, o in enumerate(outs) for e in o.events if e["type"] == "say_word")
    outs = run(stepper, 0, params, [SILENCE] * 40, {0: [first, queued], onset + 2: [say.Cancel()]})
    evs = events(outs)
    assert [e["type"] for e in evs] == ["say_start", "say_word", "say_end", "say_start", "say_end"]
    assert evs[2] == {"type": "say_end", "id": 1, "spoken": "weather", "reason": "cancelled"}
    assert evs[3]["id"] == 2 and evs[4] == {"type": "say_end", "id": 2, "spoken": "", "reason": "cancelled"}
    end = next(i for i, o in enumerate(outs) if any(e["type"] == "say_end" for e in o.events))
    assert end == onset + long_word  # the word's last token was forced: the reply ended after it
    assert "".join(o.text or "" for o in outs).strip() == "weather"


def test_barge_in_from_the_user_audio(stepper: ChatStepper) -> None:
    config = say.SayConfig(pacing="fixed", after="hold", barge_in_dbfs=-35.0, barge_in_frames=3)
    params = ChatParams(sampling(), say=config)
    loud = user_frames(9, 40)  # about -13 dBFS
    quiet = [0.003 * f for f in loud]  # about -63 dBFS: not speech
    frames = [SILENCE] * 12 + loud[:28]
    outs = run(stepper, 0, params, frames, {0: [said(stepper, TEXT)]})
    end = [e for e in events(outs) if e["type"] == "say_end"]
    assert len(end) == 1 and end[0]["reason"] == "barge_in"
    spoken = end[0]["spoken"].split()
    assert 1 <= len(spoken) < 9 and TEXT.startswith(end[0]["spoken"])
    calm = run(stepper, 0, params, [SILENCE] * 12 + quiet[:28], {0: [said(stepper, "one two")]})
    assert [e["reason"] for e in events(calm) if e["type"] == "say_end"] == ["done"]


def test_replace_ends_the_current_reply_and_says_the_new_one(stepper: ChatStepper) -> None:
    config = say.SayConfig(pacing="fixed", after="hold", queue="replace")
    params = ChatParams(sampling(), say=config)
    outs = run(
        stepper, 0, params, [SILENCE] * 60, {0: [said(stepper, TEXT)], 8: [said(stepper, "one two", 2)]}
    )
    ends = [e for e in events(outs) if e["type"] == "say_end"]
    assert ends[0]["id"] == 1 and ends[0]["reason"] == "replaced" and TEXT.startswith(ends[0]["spoken"])
    assert ends[1] == {"type": "say_end", "id": 2, "spoken": "one two", "reason": "done"}
    assert "".join(o.text or "" for o in outs).split() == [*ends[0]["spoken"].split(), "one", "two"]


def test_hold_gives_only_pad_outside_the_reply_free_does_not(stepper: ChatStepper) -> None:
    frames = user_frames(4, 40)
    commands = {10: [said(stepper, "one two")]}
    hold = run(
        stepper,
        0,
        ChatParams(sampling(), say=say.SayConfig(after="hold", barge_in_frames=0)),
        frames,
        commands,
    )
    assert "".join(o.text or "" for o in hold).split() == ["one", "two"]
    free = run(stepper, 0, ChatParams(sampling(), say=say.SayConfig(barge_in_frames=0)), frames, commands)
    assert len("".join(o.text or "" for o in free).split()) > 2  # the model's own words around the reply


def test_commands_of_a_session_that_left_are_dropped(stepper: ChatStepper) -> None:
    old = ChatParams(sampling(), say=say.SayConfig(after="hold"))
    new = ChatParams(sampling(), say=say.SayConfig(after="hold"))
    stepper.warmup(1)
    stepper.step({0: [SILENCE]}, {0: old})
    stepper.say(0, old, said(stepper, "one two"))  # old session leaves before the next step
    outs = [stepper.step({0: [SILENCE]}, {0: new} if i == 0 else {})[0] for i in range(20)]
    assert events(outs) == [] and all(o.text is None for o in outs)


# --- through the engine ---


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Any:
    modules = chat_module(tiny_chat_dir(models_root, "moshi"), 2, idle_timeout_s=5.0, say_max_chars=80)
    eng = start_engine(tmp_path_factory.mktemp("say-engine"), modules)
    yield eng
    eng.stop()


async def session(
    base: str,
    script: list[tuple[int, bytes]],
    frames: int,
    *,
    on_event: Any = None,
    **query: Any,
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Send ``script`` messages (``(frame index, raw message)``) among ``frames`` silent frames, 40 ms
    apart; returns the say events, the errors and the text pieces. ``on_event(event)`` may return
    messages to send at once."""
    evs: list[dict[str, Any]] = []
    errors: list[str] = []
    texts: list[str] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url(base, **query)) as ws:
        async with asyncio.timeout(60):
            msg = await ws.receive()
            assert msg.data == b"\x00"
            writer = sphn.OpusStreamWriter(24000)

            async def send() -> None:
                for i in range(frames):
                    for _, data in [s for s in script if s[0] == i]:
                        await ws.send_bytes(data)
                    await ws.send_bytes(b"\x01" + writer.append_pcm(SILENCE))
                    await asyncio.sleep(0.04)
                await asyncio.sleep(0.5)

            sender = asyncio.create_task(send())
            while not sender.done():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                kind, payload = msg.data[:1], msg.data[1:]
                if kind == b"\x04":
                    event = json.loads(payload)
                    evs.append(event)
                    for data in (on_event(event) if on_event else None) or []:
                        await ws.send_bytes(data)
                elif kind == b"\x05":
                    errors.append(payload.decode())
                elif kind == b"\x02":
                    texts.append(payload.decode())
            await sender
    return evs, errors, texts


def test_say_through_the_engine(engine: EngineProcess) -> None:
    script = [(0, b"\x02" + TEXT.encode())]
    evs, errors, texts = asyncio.run(session(engine.ws, script, 60, say_after="hold", say_pacing="fixed"))
    assert not errors
    assert evs[0] == {"type": "say_start", "id": 1, "text": TEXT, "words": 9, "dropped": ""}
    assert evs[-1] == {"type": "say_end", "id": 1, "spoken": TEXT, "reason": "done"}
    assert "".join(texts).strip() == TEXT


def test_bad_say_input_gets_errors_and_nothing_is_said(engine: EngineProcess) -> None:
    script = [
        (0, b"\x02hello \xc3\x28"),  # malformed UTF-8
        (0, b"\x02HELLO!"),  # nothing left once unknown characters are dropped
        (0, b"\x02" + ("one " * 30).encode()),  # 120 characters, over say_max_chars=80
        (0, b'\x04{"say": "shout"}'),
        (0, b'\x04{"other": "metadata"}'),  # not the say channel's: ignored
        (0, b"\x04not json"),  # ignored, as before
    ]
    evs, errors, texts = asyncio.run(session(engine.ws, script, 10, say_after="hold"))
    assert evs == [] and texts == []
    assert len(errors) == 4, errors
    joined = " | ".join(errors)
    assert (
        "UTF-8" in joined
        and "nothing to say" in joined
        and "limit 80" in joined
        and "only 'cancel'" in joined
    )


def test_queue_bound_then_cancel_through_the_engine(engine: EngineProcess) -> None:
    script = [(0, b"\x02one two three four five six seven")] + [(0, b"\x02tea") for _ in range(5)]
    script.append((6, b'\x04{"say": "cancel"}'))
    evs, errors, _ = asyncio.run(session(engine.ws, script, 30, say_after="hold", say_pacing="fixed"))
    assert len(errors) == 1 and "already waiting" in errors[0]  # 1 said + 4 waiting; the sixth refused
    ends = [e for e in evs if e["type"] == "say_end"]
    assert [e["id"] for e in ends] == [1, 2, 3, 4, 5] and {e["reason"] for e in ends} == {"cancelled"}
    assert [e["id"] for e in evs if e["type"] == "say_start"] == [1, 2, 3, 4, 5]
    assert all(e["spoken"] == "" for e in ends[1:]) and "one two three four".startswith(ends[0]["spoken"])


def test_cancel_on_a_word_event_and_bad_query(engine: EngineProcess) -> None:
    def on_event(event: dict[str, Any]) -> list[bytes]:
        if event["type"] == "say_word" and event["index"] == 1:
            return [b'\x04{"say": "cancel"}']
        return []

    script = [(0, b"\x02" + TEXT.encode())]
    evs, errors, _ = asyncio.run(session(engine.ws, script, 40, on_event=on_event, say_pacing="fixed"))
    end = [e for e in evs if e["type"] == "say_end"]
    assert not errors and end[0]["reason"] == "cancelled" and 2 <= len(end[0]["spoken"].split()) < 9
    assert TEXT.startswith(end[0]["spoken"])  # stopped at a word's end, soon after the cancel

    async def bad() -> int:
        async with aiohttp.ClientSession() as http, http.get(url(engine.http, say_pacing="slow")) as resp:
            body = await resp.json()
            assert "say_pacing" in body["error"] and body["reason"] == "bad_query"
            return resp.status

    assert asyncio.run(bad()) == 400


# --- selftest ---


def test_selftest_say_end_to_end_on_tiny_sets(tmp_path: Path, models_root: Path, engine_process: Any) -> None:
    chat = chat_module(tiny_chat_dir(models_root, "personaplex"), 2, default_voice="TINYF0.pt")
    asr = {
        "kind": "asr",
        "model_dir": str(stt_model_dir(models_root)),
        "slots": 1,
        "precision": "fp32",
        "device": "cpu",
    }
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"cpu_threads": 1, "modules": {**chat, "asr": asr}}))
    env_cmd = [
        sys.executable,
        "-m",
        "voice_engine",
        "selftest",
        "--say",
        "--config",
        str(config),
        "--sentences",
        "2",
    ]
    done = subprocess.run(
        [*env_cmd, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "mean nothing" in done.stdout
    assert "say constrained: WER" in done.stdout and "say fixed: WER" in done.stdout
    assert "real-time factor" in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tiny_model"] is True and report["stt"] == "module asr"
    for policy in say.PACINGS:
        entry = report["policies"][policy]
        assert entry["wer"] is not None and entry["rtf"] > 0
        assert all(s["end"] == "done" and s["transcript"] is not None for s in entry["sentences"])
        assert (tmp_path / "out" / f"{policy}-0.wav").stat().st_size > 44 + 2 * 24000
    # Against another engine's STT, chat only in the configuration.
    stt = engine_process({"asr": asr})
    config.write_text(json.dumps({"cpu_threads": 1, "modules": chat}))
    started = time.monotonic()
    remote = subprocess.run(
        [*env_cmd, "--out", str(tmp_path / "remote"), "--asr-url", stt.http],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert remote.returncode == 0, remote.stderr
    assert json.loads((tmp_path / "remote" / "report.json").read_text())["stt"] == stt.http
    assert time.monotonic() - started < 600
    none = subprocess.run(
        [*env_cmd, "--out", str(tmp_path / "nostt")], capture_output=True, text=True, timeout=600, check=False
    )
    assert none.returncode == 0 and "not measured (no STT)" in none.stdout


def test_say_options_are_checked() -> None:
    opts = parse_options("chat", {"barge_in_dbfs": -40, "say_max_pads": 0, "say_frames_per_word": 3})
    assert opts.barge_in_dbfs == -40.0 and opts.say_max_pads == 0 and opts.say_frames_per_word == 3
    with pytest.raises(ConfigError, match="say_frames_per_word: must be at least 1"):
        parse_options("chat", {"say_frames_per_word": 0})
    with pytest.raises(ConfigError, match="say_max_chars: must be at least 1"):
        parse_options("chat", {"say_max_chars": 0})
    with pytest.raises(ConfigError, match="barge_in_frames: must not be negative"):
        parse_options("chat", {"barge_in_frames": -1})
    with pytest.raises(ConfigError, match="say_max_pads: must be int"):
        parse_options("chat", {"say_max_pads": 1.5})
