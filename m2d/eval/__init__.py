"""Built-in evaluation: linear probes and fine-tuning on EVAR-format task lists (python -m m2d.eval)."""
