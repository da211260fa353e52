"""Celery worker: the app (celery_app) and one thin task that calls app.jobs.run_job."""
