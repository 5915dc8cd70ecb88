"""Example plugin in Python: decides the reward a completed task earns and logs it.

Same behaviour as plugins/reward-logger (Rust) and plugins/js/reward-logger:
rejects (for redelivery) an event whose `count` in the event data is not a
non-negative integer, to show how a handler reports an error.

Build: bash scripts/build-guest-plugins.sh (componentize-py, about 10 s).
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log
from wit_world.imports.mqplug_plugin_types import Delivery, HandlerError_Retry, TaskEvent


class Handler(exports.Handler):
    def handle(self, event: TaskEvent, delivery: Delivery) -> None:
        data = json.loads(event.event_data)
        count = data.get("count", 1)
        # bool is an int in Python; JSON true is not a count.
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            # handler-error's `retry` case: redeliver on the broker's schedule.
            raise Err(HandlerError_Retry(
                f"event_data.count must be a non-negative integer, got {json.dumps(count)}"
            ))
        points = 10 * count
        log.log(
            log.Level.INFO,
            f"{event.event_type} by user {event.user_id} in campaign {event.campaign_id} "
            f"({event.campaign_name}): granting {points} points "
            f"[tenant {event.tenant_id}, app {event.app_id}, attempt {delivery.reconsume_times + 1}]",
        )
