"""ChatGLM-6B tokenizer (placeholder until the native tokenizer lands)."""

from transformers import PreTrainedTokenizer


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "ice_text.model"}
