"""User-facing errors: one clear line, no traceback."""


class PlexusError(Exception):
    """A problem with the user's input (checkpoint, flags, world size) rather than a bug in Plexus.

    The CLI prints its message as one line and exits non-zero on every rank.
    """


class MeshBroken(PlexusError):
    """Another rank died or stopped answering in the middle of work that needs every rank: the
    job cannot go on (the server fails over to 503 and exits, like an MPI failure)."""
