"""Built-in plugins, registered exactly like third-party ones (by name, from config.toml).

Resolvers: ``conversation_id``, ``phone``. Normalizers: ``business_messaging``, ``event_time``,
``email``, ``external_id``, ``custom_data``, ``test_event_code``. Sinks: ``log``, ``test_mode``.
"""
