"""`vidmoe serve`: an HTTP job API (`/v1/jobs`), a persistent SQLite job queue, one worker thread
that runs the model, and a small web UI, in one process.

Modules: `queue` (the job store), `worker` (the generation thread), `requests` (request body ->
`GenerateSettings`, image uploads), `app` (routes, auth), `static/` (the UI page).
"""
