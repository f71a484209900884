"""invtract.io."""
