"""Backend-neutral DeepSeek-V4 model graph: config, checkpoint loading, cache, generation."""
