"""The index: the database of studies, series, instances, change feed and queries."""
