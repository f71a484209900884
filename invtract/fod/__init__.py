"""invtract.fod."""
