"""The model replica: one engine and the loop that batches its streams.

`model_server` takes validated requests; each engine's loop (`loop`) asks `scheduler` for a plan
per step, runs it with `executor`, draws tokens with `sampler` and hands text to `delivery`.
Imports run down: `model_server` → `backend.engines` → the loop's modules → shared value types.
"""
