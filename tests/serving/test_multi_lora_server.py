"""`serve --adapter NAME=PATH`: requests name "<served>:NAME", /v1/models lists adapters, adapters
load and unload at run time from --adapter-dir, a foreign adapter is refused (real SmolLM2)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

pytestmark = pytest.mark.real_model
KEY = "lora-key"


@pytest.fixture(scope="module")
def adapter_dir(smollm2_gguf, tmp_path_factory):
    from lmforge.checkpoint.load import load
    from lmforge.training.adapters import save_adapter
    from lmforge.training.lora import LoRAConfig, apply_lora

    root = tmp_path_factory.mktemp("adapters")
    model, _ = load(smollm2_gguf, dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_adapter(model, root / "mine", base_model="smollm2-135m-instruct")
    shutil.copytree(root / "mine", root / "again")
    foreign = root / "foreign"
    shutil.copytree(root / "mine", foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gemma3-270m"}))
    return root


@pytest.fixture(scope="module")
def server(smollm2_gguf, serve_process, adapter_dir):
    proc, base = serve_process(smollm2_gguf, "--api-key", KEY, "--adapter", f"mine={adapter_dir / 'mine'}",
                               "--adapter-dir", str(adapter_dir))
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _post(base, path, body):
    return httpx.post(f"{base}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=120)


def _complete(base, model):
    """The greedy text and its token log-probabilities (they show an adapter even where tokens agree)."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    response = _post(base, "/v1/completions", body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], [round(lp, 4) for lp in choice["logprobs"]["token_logprobs"]]


def test_requests_choose_their_adapter(server) -> None:
    models = httpx.get(f"{server}/v1/models", headers={"authorization": f"Bearer {KEY}"}).json()["data"]
    assert [m["id"] for m in models] == ["smol", "smol:mine"]
    base, adapted = _complete(server, "smol"), _complete(server, "smol:mine")
    assert base[1] != adapted[1]  # the adapter changes the model's probabilities
    assert _complete(server, "base:mine") == adapted and _complete(server, "smol") == base
    assert _post(server, "/v1/completions", {"model": "smol:nope", "prompt": "x", "max_tokens": 1}).status_code == 404


def test_load_and_unload_at_run_time(server) -> None:
    loaded = _post(server, "/v1/adapters", {"name": "again", "path": "again"})
    assert loaded.status_code == 200, loaded.text
    assert _complete(server, "smol:again") == _complete(server, "smol:mine")  # the same weights, the same text
    refused = _post(server, "/v1/adapters", {"name": "f", "path": "foreign"})
    assert refused.status_code == 400 and "gemma3-270m" in refused.json()["error"]["message"]
    outside = _post(server, "/v1/adapters", {"name": "g", "path": "../../etc"})
    assert outside.status_code == 400 and "outside" in outside.json()["error"]["message"]
    gone = httpx.delete(f"{server}/v1/adapters/again", headers={"authorization": f"Bearer {KEY}"})
    assert gone.status_code == 200
    assert _post(server, "/v1/completions", {"model": "smol:again", "prompt": "x", "max_tokens": 1}).status_code == 404
