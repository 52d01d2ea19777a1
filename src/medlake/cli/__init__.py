"""The command line: ``medlake serve | ingest | ls | demo``."""
