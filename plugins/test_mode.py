"""Sink: a real Meta send in which every event carries the configured ``test_event_code``.

Events sent with a test code show up in Events Manager's "Test events" tab and do not count as
conversions, so a new integration can be exercised against the real API safely. Everything
else (outbox, batching, retries, history) is the ``meta_capi`` sink's; the dataset endpoints
are ``meta_capi``'s when both are listed, else this sink's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec

from gateway import ConfigError, Settings, hookimpl
from plugins import meta_capi


class Config(meta_capi.Config, frozen=True, kw_only=True):
    test_event_code: Annotated[str, msgspec.Meta(max_length=64)] = ""


class TestModeSink(meta_capi.MetaCapiSink):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.forced_test_event_code = config.test_event_code

    def serves_datasets(self, sinks: list[str]) -> bool:
        # A gateway trying Meta out (sinks = ["test_mode"]) creates its dataset here too.
        return "meta_capi" not in sinks

    @hookimpl
    def gateway_check_config(
        self, settings: Settings, environ: Mapping[str, str], delivering: bool
    ) -> None:
        if not (self.forced_test_event_code or "").strip():
            raise ConfigError(
                f"{settings.source}: the test_mode sink needs a test event code: set"
                " `test_event_code` (from Events Manager > Test events) at"
                " `$.plugins.test_mode.test_event_code`"
            )
        super().gateway_check_config(settings, environ, delivering)


def make_plugin(config: Config) -> TestModeSink:
    return TestModeSink(config)
