"""One module per system under measurement."""
