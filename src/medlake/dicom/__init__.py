"""DICOM building blocks: header parsing, pixel-data offsets, attributes, rendering."""
