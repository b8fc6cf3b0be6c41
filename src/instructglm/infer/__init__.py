"""Using a model: load base + adapter, chat/generate, batch predict, merge."""
