"""Training: one loop for every objective, LoRA/DoRA/QLoRA adapters, recipes."""
