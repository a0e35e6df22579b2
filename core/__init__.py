"""The shared core every layer may use: atomic file writes and hashing, examples, prompt templates and
their token encoding. It imports nothing else of mmadapter."""
