"""The copy pipeline: plan (pure), buffers, and the asyncio engine."""
