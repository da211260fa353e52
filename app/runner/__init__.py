"""Running jobs: the one job-running function and everything that hands jobs to it.

    dispatch.py         API side: hand a committed job to the embedded pool or to Celery
    celery_app.py       the Celery app factory and the task name (producer and worker share them)
    embedded.py         the in-process thread pool of the embedded mode
    run.py              run_job(job_id): claim, run the engine pipeline, store, finish
    claim.py            taking a job's lease and giving the job back (finished, or queued again)
    leases.py           lease holders, the compare-and-set clauses and the heartbeat thread
    engine_callbacks.py the pipeline's progress and stop callbacks, written to / read from the DB
    results.py          storing a pipeline result: result sets, clusters, assignments, the map
    reaper.py           no job stays running or queued forever

Nothing here imports the routes or `worker/`; `worker/` imports this package. Importing a
module here loads neither the engine's pipeline (torch) nor Celery: both load when first used.
"""
