"""A chat model directory whose config.json names no architecture (as a hub repository may ship it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chat_helpers import tiny_chat_dir
from voice_engine.models import chat, loading


@pytest.mark.parametrize(("flavor", "steps"), [("moshi", 4), ("personaplex", 8)])
def test_builtin_config_takes_the_depformer_steps(tmp_path: Path, flavor: str, steps: int) -> None:
    model = loading.open_model_dir(tiny_chat_dir(tmp_path, flavor))
    config = chat.builtin_7b_config(model)
    assert config["dep_q"] == steps
    assert (config["dim"], config["num_layers"], config["n_q"]) == (4096, 32, 16)


def test_architecture_less_config_that_does_not_fit_is_a_clear_error(tmp_path: Path) -> None:
    src = tiny_chat_dir(tmp_path, "personaplex")
    config_path = src / "config.json"
    raw = json.loads(config_path.read_text())
    names = {k: raw[k] for k in ("moshi_name", "mimi_name", "tokenizer_name") if k in raw}
    config_path.write_text(json.dumps(names))
    model = loading.open_model_dir(src)
    with pytest.raises(loading.ModelDirError, match=r"does not fit config\.json"):
        chat.load_chat_lm(model, torch.device("cpu"), torch.float32)


def test_a_checkpoint_with_stacked_depformer_projections_loads_the_agents_steps(tmp_path: Path) -> None:
    """The released checkpoints stack each depformer layer's per-step projections (``in_proj_weight``,
    ``out_proj.weight``) over all 16 steps of PersonaPlex; served with 8, the first 8 must be kept."""
    src = tiny_chat_dir(tmp_path, "personaplex")
    stacked_dir = tmp_path / "stacked"
    stacked_dir.mkdir()
    for item in src.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (stacked_dir / item.name).write_bytes(item.read_bytes())
    state = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.match(r"^(depformer\.layers\.\d+\.self_attn\.)(in_projs|out_projs)\.(\d+)\.weight$", key)
        if match is None:
            out[key] = value
            continue
        name = "in_proj_weight" if match.group(2) == "in_projs" else "out_proj.weight"
        groups.setdefault(match.group(1) + name, {})[int(match.group(3))] = value
    assert groups, "the tiny set has per-step depformer projections"
    for key, steps in groups.items():
        out[key] = torch.cat([steps[i] for i in sorted(steps)], dim=0)
    save_file(out, str(stacked_dir / "model.safetensors"))

    per_step, _ = chat.load_chat_lm(loading.open_model_dir(src), torch.device("cpu"), torch.float32)
    stacked, config_dep_q = chat.load_chat_lm(
        loading.open_model_dir(stacked_dir), torch.device("cpu"), torch.float32
    )
    assert config_dep_q == 8 and stacked.dep_q == 4
    a, b = per_step.state_dict(), stacked.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
