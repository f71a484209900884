"""Bundled example data (a small FOD and a target bundle)."""
