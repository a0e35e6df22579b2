"""The test suite as a package, so `tests.helpers` is this repository's and imports the same way from every folder."""
