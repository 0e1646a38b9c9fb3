"""``voice-engine selftest --say``: how well the model speaks forced text, measured with its weights.

Through the running engine (loads no model; the health check of a production host)::

    voice-engine selftest --say --url http://HOST:8080 --key KEY --out DIR
        [--voice NAME] [--text-prompt TEXT] [--asr-url URL --asr-key KEY]
    voice-engine selftest --say --config /etc/voice-engine/voice-engine.json --running --out DIR

In this process (loads the configuration's chat module, and its asr module if it has one: the GPU needs
room for one more model beside a running engine)::

    voice-engine selftest --say --config /etc/voice-engine/voice-engine.json --out /tmp/say-selftest
    voice-engine selftest --say --config CONFIG.json --out DIR --asr-url http://stt-host:8080 --asr-key KEY

For each pacing policy (``constrained``, ``fixed``) each sentence of
:data:`~voice_engine.selftest_report.SENTENCES` is forced through the say channel in speaker-only mode
(``say_after=hold``) while the user is silent; the audio of each sentence is written to
``OUT/<policy>-<n>.wav`` (24 kHz, 16-bit mono).

* ``--url URL`` (key ``--key``, default ``public_token``), or ``--config CONFIG --running`` (the
  address from its ``host`` and ``port``, ``0.0.0.0`` read as ``127.0.0.1``, the key from its first
  ``api_keys`` entry; nothing else of it is used): the engine's ``/status`` names its chat module and
  whether it has an ``asr`` one; per policy one real ``/api/chat`` session
  (``say_pacing=POLICY&say_after=hold``, ``seed``, and ``voice_prompt`` / ``text_prompt`` from
  ``--voice`` / ``--text-prompt``, else the module's defaults) gets every sentence as ``0x02`` in
  turn, with silent Ogg/Opus user frames sent up to 8 frames ahead of the audio received (faster than
  real time, bounded; :mod:`voice_engine.selftest_remote`); a sentence's clip is the ``0x01`` audio
  from the step of its ``say_start`` to 12 steps after its ``say_end``. The real-time factor is the
  wall time of those steps over their audio time: how fast the engine steps one session when it is
  never kept waiting for input (Opus and the websocket included, beside whatever other sessions it
  serves). Whether the model is a tiny test model is read from its ``model_dir/config.json`` when this
  machine can read it (the engine on this host); otherwise the output says the size is unknown.
* ``--config CONFIG`` alone: the chat module (``--module NAME``, default the first one) is loaded here
  with one slot, its default voice and text prompt, and stepped directly
  (:mod:`voice_engine.selftest_local`); the real-time factor is the chat steps' compute time over
  their audio time. A running engine is not needed.

The WAVs are then transcribed: by the same engine's ``/api/asr-streaming`` (through a running engine
that has an ``asr`` module) or the configuration's own ``asr`` module loaded here (in process), or, with
``--asr-url``, by another engine's ``/api/asr-streaming`` (Kyutai's protocol; ``--asr-key``). Printed
per policy: the word error rate against the sentences (lower case, punctuation removed), the real-time
factor (under 1 is faster than real time) and the step time; ``OUT/report.json`` holds the same figures,
the words forced and every transcript. Without any STT the WER is reported as not measured. On a tiny
test model the whole run works but the figures mean nothing, and the output says so.

Exit status: 0 when every sentence was said to its end and (where an STT was available) transcribed;
1 when one was not, or the engine failed during the run; 2 on a bad argument or configuration, an
unreachable engine, one without a chat module, or a session refused for its key or its query.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, load
from .selftest_report import (
    SENTENCES,
    SelftestError,
    Spoken,
    UsageError,
    report,
    transcribe_remote,
    write_wav,
)

PROG = "voice-engine selftest"
RTF_IN_PROCESS = "compute time of the chat steps in this process / audio time"
RTF_RUNNING = (
    "wall time of the session's steps / audio time, user frames sent ahead of real time (at most 8 "
    "waiting): how fast the engine steps one session, Opus and websocket included"
)


def _check(args: argparse.Namespace) -> None:
    """Raises :class:`UsageError` for a bad combination of arguments."""
    if not args.say:
        raise UsageError("choose what to test (--say)")
    if not 1 <= args.sentences <= len(SENTENCES):
        raise UsageError(f"--sentences must be 1..{len(SENTENCES)}")
    if bool(args.config) == bool(args.url):
        raise UsageError("give --config CONFIG (with --running for its running engine) or --url URL")
    running = bool(args.url) or args.running
    if args.running and not args.config:
        raise UsageError("--running goes with --config (--url is always a running engine)")
    if args.key is not None and not args.url:
        raise UsageError("--key goes with --url (with --config, the key is its first api_keys entry)")
    if not running and (args.voice or args.text_prompt is not None):
        raise UsageError("--voice and --text-prompt need a running engine (--url, or --config --running)")
    if running and args.module:
        raise UsageError("--module is for the in-process run (a running engine has one chat module)")


def _speak_running(
    args: argparse.Namespace,
) -> tuple[list[Spoken], bool | None, str | None, str, str]:
    """Speak through the running engine; returns the results, tiny, the STT URL and its key, and the
    engine's address."""
    from . import selftest_remote as remote  # noqa: PLC0415

    if args.url:
        base, key = args.url.rstrip("/"), args.key if args.key is not None else "public_token"
    else:
        from .probe import _from_config  # noqa: PLC0415 - the probe's reading of an engine's address

        try:
            base, key, _ = _from_config(Path(args.config))
        except (ConfigError, OSError) as exc:
            raise UsageError(f"configuration error: {exc}") from None
    target = asyncio.run(remote.find(base, key, args.timeout))
    prompts = remote.Prompts(voice=args.voice, text=args.text_prompt, seed=args.seed)
    sentences = SENTENCES[: args.sentences]
    results = asyncio.run(remote.speak_all(target, sentences, prompts, args.timeout))
    if args.asr_url:
        return results, target.tiny, args.asr_url, args.asr_key, base
    if target.has_asr:
        return results, target.tiny, base, key, base
    return results, target.tiny, None, "", base


def _speak_here(args: argparse.Namespace) -> tuple[list[Spoken], bool, Any]:
    """Speak in this process; returns the results, tiny, and the asr module's configuration (or None)."""
    from . import selftest_local as local  # noqa: PLC0415

    try:
        cfg = load(Path(args.config))
    except ConfigError as exc:
        raise UsageError(f"configuration error: {exc}") from None
    chat_cfg = local.module_of(cfg, "chat", args.module)
    if chat_cfg is None:
        which = f"named {args.module!r} " if args.module else ""
        raise UsageError(f"{args.config} has no chat module {which}(kind 'chat')")
    if cfg.cpu_threads > 0:
        import torch  # noqa: PLC0415

        torch.set_num_threads(cfg.cpu_threads)
    try:
        results, tiny = local.speak_all(chat_cfg, args.seed, SENTENCES[: args.sentences])
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise UsageError(f"cannot load the chat model: {exc}") from None
    return results, tiny, None if args.asr_url else local.module_of(cfg, "asr", None)


def _transcribe(
    args: argparse.Namespace, results: list[Spoken], stt_url: str | None, stt_key: str, asr_cfg: Any
) -> tuple[str | None, bool]:
    """Fill in the transcripts; returns the STT's name and whether one was asked for."""
    clips = [r.pcm for r in results]
    wanted = stt_url is not None or asr_cfg is not None
    try:
        if stt_url is not None:
            stt: str | None = stt_url
            texts: list[str] | None = transcribe_remote(stt_url, stt_key, clips, args.timeout)
        elif asr_cfg is not None:
            from .selftest_local import transcribe_local  # noqa: PLC0415

            stt = f"module {asr_cfg.name}"
            texts = transcribe_local(asr_cfg, clips)
        else:
            stt, texts = None, None
    except SelftestError as exc:
        print(f"{PROG}: the STT failed: {exc}", file=sys.stderr)
        return None, wanted
    if texts is not None:
        for r, text in zip(results, texts, strict=True):
            r.transcript = text
    return stt, wanted


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        running = bool(args.url) or args.running
        if running:
            results, tiny, stt_url, stt_key, engine = _speak_running(args)
            asr_cfg = None
        else:
            results, tiny, asr_cfg = _speak_here(args)
            stt_url, stt_key, engine = (args.asr_url or None), args.asr_key, None
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SelftestError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        write_wav(out / f"{r.policy}-{r.index}.wav", r.pcm)
    stt, wanted = _transcribe(args, results, stt_url, stt_key, asr_cfg)
    rtf_note = RTF_RUNNING if running else RTF_IN_PROCESS
    summary = report(results, tiny, stt, {"engine": engine, "rtf_measures": rtf_note})
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if tiny:
        print("tiny test model: the run works end to end, but these figures mean nothing")
    elif tiny is None:
        print(
            "the chat model's size is unknown here (its model_dir is not readable on this machine): "
            "the figures mean something only with real weights"
        )
    for policy, entry in summary["policies"].items():
        wer = "not measured (no STT)" if entry["wer"] is None else f"{100 * entry['wer']:.1f} %"
        print(
            f"say {policy}: WER {wer}, real-time factor {entry['rtf']} ({entry['step_ms']} ms per 80 ms step)"
        )
    print(f"real-time factor: {rtf_note}; under 1 is faster than real time")
    print(f"WAVs and report.json in {out}")
    incomplete = [r for r in results if r.reason != "done"]
    if incomplete:
        print(f"{PROG}: {len(incomplete)} sentence(s) did not end with say_end done", file=sys.stderr)
        return 1
    if wanted and stt is None:
        return 1
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "selftest", help="measure the say channel (WER per pacing, RTF), in process or through an engine"
    )
    cmd.add_argument("--say", action="store_true", help="force fixed sentences through the say channel")
    cmd.add_argument("--config", default="", help="the engine's JSON configuration")
    cmd.add_argument(
        "--running",
        action="store_true",
        help="with --config: through the engine it describes, running (its address and key only)",
    )
    cmd.add_argument("--url", default="", help="http://HOST:PORT of a running engine (loads no model here)")
    cmd.add_argument("--key", default=None, help="its API key, with --url (default public_token)")
    cmd.add_argument("--voice", default="", help="voice_prompt of the sessions (running engine)")
    cmd.add_argument(
        "--text-prompt",
        default=None,
        help="text_prompt of the sessions (running engine; default the module's)",
    )
    cmd.add_argument("--module", default=None, help="in process: the chat module's name (default the first)")
    cmd.add_argument("--out", required=True, help="folder for the WAVs and report.json")
    cmd.add_argument("--asr-url", default="", help="transcribe with this engine's /api/asr-streaming instead")
    cmd.add_argument("--asr-key", default="public_token", help="its API key (header kyutai-api-key)")
    cmd.add_argument("--seed", type=int, default=1)
    cmd.add_argument(
        "--sentences",
        type=int,
        default=len(SENTENCES),
        help=f"how many of the {len(SENTENCES)} sentences to say",
    )
    cmd.add_argument("--timeout", type=float, default=60.0, help="seconds any one wait may take")
    cmd.set_defaults(func=run)
