"""Adapters on disk and on the hub: adapter folders, official checkpoint imports, model cards."""
