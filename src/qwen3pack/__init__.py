"""qwen3pack: Qwen3 checkpoints packed per tensor-parallel rank, run by a lean C++ runtime."""
__version__ = "0.1.0"
