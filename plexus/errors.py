"""User-facing errors: one clear line, no traceback."""


class PlexusError(Exception):
    """A problem with the user's input (checkpoint, flags, world size) rather than a bug in Plexus.

    The CLI prints its message as one line and exits non-zero on every rank.
    """
