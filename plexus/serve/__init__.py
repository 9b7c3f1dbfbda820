"""`plexus serve` on rank 0: the HTTP app, the OpenAI wire format, the request queue, metrics, and
the lifecycle of every rank."""
