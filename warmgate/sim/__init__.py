"""`warmgate sim`: a deterministic stand-in for vLLM's OpenAI-compatible server.

Layout: `tokenizer` (vocabulary of 1024), `costs` (pure lazy-compilation and compute
model), `generate` (deterministic output plans), `engine` (batching scheduler on
asyncio), `api` (request validation), `responses` (OpenAI JSON and SSE chunks),
`server` (routes, lifecycle, faults), `metrics` (Prometheus), `settings` and `cli`.
"""
