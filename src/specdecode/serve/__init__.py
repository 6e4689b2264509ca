"""`specdecode serve`: an OpenAI-compatible HTTP server in front of the speculative engine.

The contract: a request (`protocol.py`) becomes a `Job` (token ids, sampling parameters, the
server's speculative configuration) handed to the `Scheduler` (`scheduler.py`), which owns the
model and runs jobs step by step on its own thread, pushing each step's tokens back to the
request's event loop. A client that goes away cancels its job, which stops within one step.
`metrics.py` counts what the jobs did, under vLLM's metric names; `app.py` is the HTTP layer.

Greedy output is the model's own token for token, as `specdecode generate` gives it: the server
calls the same engine.
"""
