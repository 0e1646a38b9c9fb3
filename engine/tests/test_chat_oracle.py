"""Oracle (opt-in): our PersonaPlex prefill and first steps against NVIDIA's fork, on one tiny set.

``PERSONAPLEX_SRC`` names a checkout of ``NVIDIA/personaplex`` or an archive of one (``.tar.gz``,
``.tgz``, ``.zip``); without it, or when it is unusable, every test here is skipped with the reason.
``PERSONAPLEX_PYTHONPATH`` (optional, ``os.pathsep``-separated) is added to the fork's process only:
the fork's WAV prompt path needs ``pyloudnorm`` (which it does not declare); without it the WAV cases
are skipped, saying so.

The fork's side runs in its own process (``oracle_fork.py``: its package is also called ``moshi``),
on the tiny PersonaPlex-shaped set's weights, and saves what it computed. Ours is the engine's
``ChatStepper`` with the prefill the ``chat`` module builds (``models/chat_prompt.py``), greedy. For
each voice and text prompt: the text logits of every model call (prefill and 20 conversation steps)
within 1e-4, the same tokens (text and agent audio) at every conversation step, the same Mimi codes
for the voice and the user's audio, and the same text prompt tokens; and the ``.pt`` the fork stores
for a WAV prompt replays as ours does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from chat_helpers import tiny_chat_dir, user_frames
from voice_engine.models import chat_prompt, loading
from voice_engine.models.chat import ChatParams, ChatStepper
from voice_engine.models.sampling import SamplingParams

ENV = "PERSONAPLEX_SRC"
ENV_PATH = "PERSONAPLEX_PYTHONPATH"
FORK_SCRIPT = Path(__file__).with_name("oracle_fork.py")
STEPS = 20
SLOT = 1
LOGIT_TOL = 1e-4
TEXT = "you are a tiny model"
PROBE_TEXTS = [TEXT, "  listen to the music  ", "<system> already wrapped <system>", "   "]
CASES = {  # name -> (voice file or None, text prompt)
    "pt_text": ("TINYF0.pt", TEXT),
    "pt_no_text": ("TINYF0.pt", ""),
    "wav_text": ("TINYF0.wav", "the weather is nice"),
    "no_voice_text": (None, TEXT),
}
FORK_TIMEOUT_S = 600


def _find_package_dir(root: Path) -> Path | None:
    """The folder holding the fork's ``moshi`` package (``<checkout>/moshi``), at ``root`` or one down."""
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (base / "moshi" / "moshi" / "models" / "lm.py").is_file():
            return base / "moshi"
    return None


def _extract(archive: Path, dest: Path) -> None:
    name = archive.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    elif name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (dest / member).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise ValueError(f"{member}: outside the archive's folder")
            zf.extractall(dest)
    else:
        raise ValueError("not a directory, nor a .tar.gz, .tgz or .zip archive")


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    extra = os.environ.get(ENV_PATH, "")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
    )


@dataclass(frozen=True)
class Fork:
    package_dir: Path
    has_pyloudnorm: bool


@pytest.fixture(scope="module")
def fork(tmp_path_factory: pytest.TempPathFactory) -> Fork:
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"{ENV} is not set (a checkout or .tar.gz/.zip of NVIDIA/personaplex): oracle not run")
    src = Path(value)
    if not src.exists():
        pytest.skip(f"{ENV}={value}: no such file or directory")
    if src.is_file():
        dest = tmp_path_factory.mktemp("personaplex-src")
        try:
            _extract(src, dest)
        except (ValueError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
            pytest.skip(f"{ENV}={value}: unusable ({exc})")
        src = dest
    package_dir = _find_package_dir(src)
    if package_dir is None:
        pytest.skip(f"{ENV}={value}: no moshi/moshi/models/lm.py in it (not NVIDIA/personaplex)")
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import moshi; "
        "from moshi.models import LMGen, LMModel, MimiModel; "
        "print(moshi.__file__); import importlib.util as u; print(u.find_spec('pyloudnorm') is not None)"
    )
    done = _run(["-c", probe, str(package_dir)], 120)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(
            f"{ENV}={value}: the fork's moshi does not import here (torch {torch.__version__}): {last}"
        )
    lines = done.stdout.strip().splitlines()
    if not Path(lines[-2]).resolve().is_relative_to(package_dir.resolve()):
        pytest.skip(f"{ENV}={value}: 'import moshi' found {lines[-2]}, not the fork's package")
    return Fork(package_dir, lines[-1] == "True")


@pytest.fixture(scope="module")
def pp_dir(models_root: Path) -> Path:
    return tiny_chat_dir(models_root, "personaplex")


@pytest.fixture(scope="module")
def stepper(pp_dir: Path) -> ChatStepper:
    torch.set_num_threads(1)
    return ChatStepper.from_model_dir(pp_dir, 2, "fp32", "cpu")


def _voice(stepper: ChatStepper, path: Path) -> chat_prompt.Voice:
    """As the ``chat`` module loads a voice file."""
    if path.suffix == ".pt":
        return chat_prompt.load_voice_pt(path, stepper.layout)
    model = loading.open_model_dir(path.parent.parent)  # <model dir>/voices/<file>
    mimi = ChatStepper.load_mimi(model, stepper.device, stepper.dep_q)
    return chat_prompt.encode_voice(mimi, chat_prompt.read_voice_audio(path), stepper.device)


def _ours(stepper: ChatStepper, voice: chat_prompt.Voice | None, text: str, frames: list[np.ndarray]) -> dict:
    """Our prefill and ``len(frames)`` steps in slot ``SLOT``: text logits of every model call, the
    tokens every ``LMGen.step`` returned, the user codes the LM was given, the text prompt tokens."""
    tokens = chat_prompt.text_prompt_tokens(stepper.tokenizer, text)
    plan = chat_prompt.build_prefill(stepper.layout, voice, tokens)
    greedy = SamplingParams(seed=0, temp=0.0, temp_text=0.0, top_k=250, top_k_text=25)
    logits: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    hook = stepper.lm.text_linear.register_forward_hook(
        lambda _m, _i, out: logits.append(out[SLOT].reshape(-1).detach().clone())
    )
    gen = stepper.gen
    step = gen.step

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        outs.append(out[SLOT, :, 0].clone())
        return out

    gen.step = recording  # type: ignore[method-assign]
    try:
        stepper.warmup(1)
        logits.clear()
        outs.clear()
        resets = {SLOT: ChatParams(greedy, plan)}
        while True:
            result = stepper.step({SLOT: []}, resets)
            resets = {}
            if SLOT in result and result[SLOT].ready:
                break
        user = []
        for frame in frames:
            stepper.step({SLOT: [frame]}, {})
            user.append(stepper._user_codes[SLOT, :, 0].clone())
    finally:
        hook.remove()
        del gen.step
    return {
        "text_tokens": tokens,
        "prefill_steps": plan.steps,
        "logits": torch.stack(logits),
        "tokens": torch.stack(outs),
        "user_codes": torch.stack(user),
    }


@pytest.fixture(scope="module")
def oracle(
    fork: Fork, stepper: ChatStepper, pp_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Both sides of every case that can run: ``{"cases": {name: (ours, fork's)}, ...}``."""
    work = tmp_path_factory.mktemp("oracle")
    model = loading.open_model_dir(pp_dir)
    frames = user_frames(21, STEPS + 1)  # the fork's first step after its prompts is our last prefill step
    np.save(work / "user.npy", np.stack(frames))
    voices = pp_dir / "voices"
    cases = {n: c for n, c in CASES.items() if fork.has_pyloudnorm or not str(c[0]).endswith(".wav")}
    request = {
        "lm_kwargs": {k: v for k, v in model.info.lm_config.items() if k != "personaplex"},
        "lm_weights": str(model.info.moshi_weights),
        "mimi_config": model.info.mimi_config,
        "mimi_weights": str(model.info.mimi_weights),
        "tokenizer": str(model.info.tokenizer),
        "silence_tokens": list(stepper.layout.silence),
        "sine_tokens": list(stepper.layout.sine),
        "probe_texts": PROBE_TEXTS,
        "cases": [
            {
                "name": name,
                "voice": None if v is None else str(voices / v),
                "text": text,
                "user_pcm": str(work / "user.npy"),
            }
            for name, (v, text) in cases.items()
        ],
        "save_pt_from": str(voices / "TINYF0.wav") if fork.has_pyloudnorm else None,
    }
    (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
    args = [str(FORK_SCRIPT), str(fork.package_dir), str(work / "request.json"), str(work / "fork.pt")]
    done = _run(args, FORK_TIMEOUT_S)
    assert done.returncode == 0, f"the fork's side failed:\n{done.stderr[-4000:]}"
    theirs = torch.load(str(work / "fork.pt"), weights_only=True)
    ours = {}
    for name, (v, text) in cases.items():
        voice = None if v is None else _voice(stepper, voices / v)
        ours[name] = _ours(stepper, voice, text, frames[:STEPS])
    return {
        "cases": {name: (ours[name], theirs["cases"][name]) for name in cases},
        "probe_tokens": theirs["probe_tokens"],
        "saved_pt": theirs.get("saved_pt"),
    }


def _pair(oracle: dict[str, Any], name: str) -> tuple[dict, dict]:
    if name not in oracle["cases"]:
        pytest.skip(f"{name}: the fork's WAV path needs pyloudnorm, not importable there (see {ENV_PATH})")
    return oracle["cases"][name]


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_first_steps_match_the_fork(oracle: dict[str, Any], name: str) -> None:
    ours, theirs = _pair(oracle, name)
    assert ours["text_tokens"] == theirs["text_tokens"]
    # One model call per prefill step of ours; the fork's first call only fills its cache, and its first
    # step after the prompts is our last prefill step.
    assert ours["prefill_steps"] == theirs["prompt_calls"] + 1
    assert ours["logits"].shape == theirs["logits"].shape
    diff = (ours["logits"] - theirs["logits"]).abs().max().item()
    print(f"{name}: {ours['logits'].shape[0]} model calls, max text logit difference {diff:.3g}")
    assert diff <= LOGIT_TOL
    assert torch.equal(ours["user_codes"], theirs["user_codes"][:STEPS])  # same Mimi codes of the user
    # The tokens of our last prefill step and our STEPS steps = the fork's STEPS + 1 steps.
    # The fork's depformer also predicts the user's codebooks (its dep_q = n_q): text + agent only.
    got, want = ours["tokens"][-(STEPS + 1) :], theirs["tokens"][:, : ours["tokens"].shape[1]]
    assert got.shape == want.shape
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert (got[-STEPS:, 0] >= 0).all() and (got[-STEPS:, 1:] >= 0).all()  # generated, not placeholders


def test_wav_voice_codes_match_the_fork(oracle: dict[str, Any], stepper: ChatStepper, pp_dir: Path) -> None:
    _, theirs = _pair(oracle, "wav_text")
    voice = _voice(stepper, pp_dir / "voices" / "TINYF0.wav")
    assert isinstance(voice, chat_prompt.VoiceCodes)
    assert torch.equal(voice.codes, theirs["voice_codes"])


def test_text_prompt_tokens_match_the_fork(oracle: dict[str, Any], stepper: ChatStepper) -> None:
    for text, tokens in oracle["probe_tokens"].items():
        assert chat_prompt.text_prompt_tokens(stepper.tokenizer, text) == tokens, text


def test_the_forks_pt_of_a_wav_replays_as_ours(
    oracle: dict[str, Any], stepper: ChatStepper, pp_dir: Path
) -> None:
    saved = oracle["saved_pt"]
    if saved is None:
        pytest.skip(f"the fork's WAV path needs pyloudnorm, not importable there (see {ENV_PATH})")
    ours = torch.load(str(pp_dir / "voices" / "TINYF0.pt"), weights_only=True)
    assert saved["embeddings"].shape == ours["embeddings"].shape
    diff = (saved["embeddings"] - ours["embeddings"]).abs().max().item()
    print(f"the fork's .pt of TINYF0.wav: max embedding difference from ours {diff:.3g}")
    assert diff <= 1e-5
    assert saved["cache"].shape == ours["cache"].shape
    defined = ours["cache"] != -2  # ours leaves the ring entries no later step reads undefined
    assert torch.equal(saved["cache"][defined], ours["cache"][defined])
    # And the fork's own file, loaded and replayed by us, gives the same conversation as ours.
    frames = user_frames(22, 6)
    mine = chat_prompt.load_voice_pt(pp_dir / "voices" / "TINYF0.pt", stepper.layout)
    a = _ours(stepper, mine, TEXT, frames)
    path = pp_dir.parent / "fork-TINYF0.pt"
    torch.save(saved, str(path))
    b = _ours(stepper, chat_prompt.load_voice_pt(path, stepper.layout), TEXT, frames)
    assert (a["logits"] - b["logits"]).abs().max().item() <= LOGIT_TOL
    assert torch.equal(a["tokens"][-6:], b["tokens"][-6:])
