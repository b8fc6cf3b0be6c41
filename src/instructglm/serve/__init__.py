"""Serving: Gradio web chat and an OpenAI-compatible API."""
