"""`plexus bench`: running the phases, the probes, the baselines, the report."""
