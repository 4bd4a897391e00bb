"""The copy pipeline: plan (pure), scheduler, workers and writers, retries, commits, buffers,
and the asyncio engine (engine.py) that runs them."""
