"""PEFT's adapter folder layout, shared by every adapter kind (LoRA, prefix tuning, bottleneck):
adapter_config.json + adapter_model.safetensors, tensor names under PEFT's `base_model.model.` prefix."""

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
