"""End-to-end recipe runs on tiny models."""
