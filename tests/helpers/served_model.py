"""The name the serving tests' `served` model answers to, for requests written before a server exists."""

MODEL_NAME = "tiny-v1"
