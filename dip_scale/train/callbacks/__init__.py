"""Cross-cutting training behaviour as Composer callbacks, one per file."""
