"""``latentdiff serve``: the pipeline over HTTP, with a durable queue.

- ``config.py``  the server's settings and its limits
- ``queue.py``   the SQLite job queue: jobs, their images, idempotency keys, retention
- ``jobs.py``    job bodies (pydantic), their checks (through ``generation/request.py``), batch keys
- ``worker.py``  the thread that drains the queue in shared, fixed-size U-Net batches
- ``app.py``     the FastAPI application: auth, limits, the native ``/v1`` routes, the web page
- ``a1111.py``   the A1111-compatible ``/sdapi/v1`` routes
- ``static/``    the web page (plain HTML and JavaScript)

Nothing here is imported by ``import latentdiff``; FastAPI and uvicorn are the ``serve`` extra.
"""
