"""simnet."""
