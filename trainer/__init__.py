"""HyperLoRA distillation trainer (hypernetwork, LoRA injection, top-K KL, training loop)."""
