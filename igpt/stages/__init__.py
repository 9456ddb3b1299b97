"""igpt."""
