"""Service-wide settings and logging."""
