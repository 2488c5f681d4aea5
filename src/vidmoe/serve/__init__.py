"""`vidmoe serve`: an HTTP job API (`/v1/jobs`), a persistent SQLite job queue, one worker thread
that runs the model, and a small web UI, in one process.

Modules: `app` (`create_app`), `state` (`ServeConfig`, the state routes read), `routes` (the
routes), `guard` (token, Host, Origin), `requests` (request body -> `GenerateSettings`, image
uploads, limits), `views` (what a job looks like in the API), `queue` (the job store), `worker`
(the generation thread), `static/` (the UI page).
"""
