"""Built-in structured plugin."""
