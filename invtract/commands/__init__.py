"""invtract.commands."""
