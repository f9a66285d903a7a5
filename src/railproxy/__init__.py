"""railproxy."""
