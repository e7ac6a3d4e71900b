"""Gradio chat UI for the OpenAI-compatible backend (`python -m chatui`)."""
