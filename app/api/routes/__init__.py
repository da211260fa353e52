"""Route modules, one per resource (datasets, jobs, health; pages later)."""
