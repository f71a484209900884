"""invtract.tracking."""
