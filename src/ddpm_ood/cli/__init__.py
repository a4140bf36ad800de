"""Command-line layer: argument parsing and the error boundary. The library never parses argv."""
