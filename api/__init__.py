"""The app's OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions), served beside the web UI.

Modules, one job each: schema (validate a request body), errors (OpenAI-style error bodies and
how engine errors map to HTTP codes), stops (stop strings in a stream), waiting (the bounded
wait queue), service (one answer through the engine), bridge (a blocking answer as an async
stream), objects (the JSON bodies clients expect), routes (HTTP endpoints and SSE), auth (API
key), server (building and mounting it). The API only talks to the engine facade
(models/engine.py), like the UI.
"""
