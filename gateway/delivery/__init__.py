"""The host's delivery service: one outbox dispatcher per sink that sends through it."""
