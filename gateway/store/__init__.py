"""Persistence: the SQLite store, its schema and migrations, and the SQL of each write.

``database.Store`` is what the rest of the gateway talks to; the other modules hold the write
operations it submits to its group-commit ``writer``, one module per concern (the capture of
webhooks, their archive, the outbox of deliveries).
"""
