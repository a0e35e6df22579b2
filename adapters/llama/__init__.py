"""LLaMA-specific loading: Meta's original checkpoint layout and its conversion to Hugging Face's."""
