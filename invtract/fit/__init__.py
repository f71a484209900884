"""invtract.fit."""
