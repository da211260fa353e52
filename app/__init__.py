"""The SCAN image-clustering web service: REST API, storage, job running (see app.main)."""
