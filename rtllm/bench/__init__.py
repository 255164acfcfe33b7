"""rtllm.bench."""
