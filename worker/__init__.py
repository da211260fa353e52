"""Celery worker: the app (celery_app) and one thin task that calls app.runner.run.run_job."""
