"""invtract.losses."""
