"""Built-in spec_decode plugin."""
