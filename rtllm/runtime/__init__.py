"""rtllm.runtime."""
