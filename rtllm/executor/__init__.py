"""rtllm.executor."""
