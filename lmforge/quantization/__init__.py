"""Quantization: int8 (dynamic, static, SmoothQuant), int4 (RTN, GPTQ, AWQ) and NF4, by module swap; see quantize.py."""
