"""Quantization: NF4 (QLoRA) weights; int8, GPTQ and AWQ to come."""
