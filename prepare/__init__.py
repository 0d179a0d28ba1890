"""Import other multi-view formats as object folders: `python -m guided_concepts.prepare`."""
