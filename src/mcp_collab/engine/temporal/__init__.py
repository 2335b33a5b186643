"""Runs on Temporal (``MCP_COLLAB_ENGINE=temporal``): a run is a workflow, a step an activity.

- ``jobs``: what crosses Temporal (plain pydantic models, no temporalio import).
- ``workflow``: the run's workflow; it hosts the strategy's program, unchanged, over a ``RunContext``
  whose steps, spaces and diffs are activities on the queue of a worker that has the directory.
- ``activities``: what a worker runs: steps (through the same ``StepExecutor`` as the local
  engine), spaces, diffs, and the run's persistence.
- ``worker``: ``mcp-collab worker``: serves the workflow queue and its own step queue.
- ``client``: the server side: starts, waits on, cancels and reconciles runs.
- ``codec``: what crosses Temporal, encrypted with MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS (server and workers alike).

Only the server side is imported by the MCP server, and only when the engine is Temporal, so the
local engine never loads temporalio.
"""
