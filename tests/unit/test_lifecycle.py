"""The worker's lifecycle service without a broker: what the sweep asks for."""

from __future__ import annotations

from marvin_faust.lifecycle import Lifecycle
from marvin_faust.models import ForgetReason, now_ns


class SentForgets:
    """Stands in for the ChatClient: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list = []

    async def send_forgets(self, forgets):
        self.sent.extend(forgets)


async def test_the_sweep_asks_to_expire_only_what_is_due(unit_app):
    lifecycle = Lifecycle(unit_app)
    client = lifecycle._client = SentForgets()
    hour = 3600 * 10**9
    lifecycle.written(0, "idle", [{"timestamp": now_ns() - 31 * 24 * hour}])
    lifecycle.written(1, "live", [{"timestamp": now_ns() - hour}])
    assert await lifecycle.sweep() == 1
    [(forget, partition, _)] = client.sent
    assert (forget.conversation_id, partition) == ("idle", 0)
    assert forget.reason is ForgetReason.EXPIRED
    assert forget.idle_since == lifecycle.index.last_activity(0, "idle")
    # asked once: until the agent applies it (or it turns out active), not again
    assert await lifecycle.sweep() == 0
    lifecycle.deleted(0, "idle")
    assert len(lifecycle.index) == 1
