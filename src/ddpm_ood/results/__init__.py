"""Results files: CSV columns and file names (schema), the resumable writer and its settings sidecar (writer)."""
