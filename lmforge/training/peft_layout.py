"""PEFT's adapter folder layout, shared by every adapter kind (LoRA, prefix tuning, bottleneck):
adapter_config.json + adapter_model.safetensors, tensor names under PEFT's `base_model.model.` prefix."""

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def copy_adapter_tensors(expected: dict, state: dict, path, what: str, hint: str) -> None:
    """Copy `state` into the adapter's parameters `expected` (same names and shapes, else a ValueError
    naming the folder, the first mismatches and `hint`)."""
    import torch

    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: {what} not fit this model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}; {hint}")
    with torch.no_grad():
        for name, param in expected.items():
            if param.shape != state[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(param.shape)}")
            param.copy_(state[name])
