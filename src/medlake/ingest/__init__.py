"""Ingestion: taking files into the lake and the index (STOW-RS, C-STORE, bulk import)."""
