"""{{name}}: an mqplug plugin. It handles the marketing platform's task
events (`TaskEventMessage` on `marketing.task.completed`).

Returning acknowledges the message. `raise Err(HandlerError_Retry(reason))`
retries it on the broker's schedule, `HandlerError_RetryAfter(RetryAfter(...))`
no sooner than a delay, `HandlerError_DeadLetter(reason)` sends it to the
dead-letter queue now.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log
from wit_world.imports.mqplug_plugin_types import Delivery, HandlerError_DeadLetter, TaskEvent


class Handler(exports.Handler):
    def handle(self, event: TaskEvent, delivery: Delivery) -> None:
        if not event.tenant_id:
            # No retry will give the event a tenant.
            raise Err(HandlerError_DeadLetter("no tenant"))
        log.log(
            log.Level.INFO,
            f"{event.event_type} by user {event.user_id} in campaign {event.campaign_id}, "
            f"attempt {delivery.reconsume_times + 1}",
        )
