"""DICOMweb services (PS3.18): search, retrieve, store, delete — framework-free."""
