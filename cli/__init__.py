"""The front door: the `mmadapter` command and the embedded demo application."""
