"""Runs and where they execute: the SQLite run store, jobs and their queue, the dashboard's worker,
sweep executors (local processes, Ray), presets, the shipped reference sweep and users' uploads.
Built on the engine; knows no method by name (methods register their job kinds)."""
