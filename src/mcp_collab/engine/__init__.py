"""The engine under the WorkerOrchestrator: plans, steps, the run lifecycle, persistence.

Strategies are programs (``mcp_collab.strategies``); the engine gives them steps, runs them inside
the run's cancel scope and records everything as it happens."""
