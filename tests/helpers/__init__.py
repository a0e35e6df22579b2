"""Code the test folders share: fixture builders, reference forwards and the fake hub, imported as `tests.helpers.…`."""
