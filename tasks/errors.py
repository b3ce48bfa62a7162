"""Errors a user can cause; kept free of heavy imports so the CLI can catch them cheaply."""


class InputError(ValueError):
    """A problem with a user's file or option that retrying cannot fix; the message names it."""
