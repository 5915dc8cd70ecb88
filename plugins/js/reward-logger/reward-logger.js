// Example plugin in JavaScript: decides the reward a completed task earns and logs it.
//
// Same behaviour as plugins/reward-logger (Rust) and plugins/python/reward_logger:
// rejects (for redelivery) an event whose `count` in the event data is not a
// non-negative integer, to show how a handler reports an error.
//
// Build: bash scripts/build-guest-plugins.sh (componentize-js, about 10 s).
// WIT names become camelCase; a u64 such as userId is a BigInt.

import { log } from 'mqplug:plugin/log@0.2.0';

export const handler = {
  handle(event, delivery) {
    const data = JSON.parse(event.eventData);
    const count = data.count === undefined ? 1 : data.count;
    if (!Number.isSafeInteger(count) || count < 0) {
      // A thrown handler-error is the `err` of handle's result; `retry`
      // redelivers on the broker's schedule.
      throw {
        tag: 'retry',
        val: `event_data.count must be a non-negative integer, got ${JSON.stringify(count)}`,
      };
    }
    const points = 10 * count;
    log(
      'info',
      `${event.eventType} by user ${event.userId} in campaign ${event.campaignId} ` +
        `(${event.campaignName}): granting ${points} points ` +
        `[tenant ${event.tenantId}, app ${event.appId}, attempt ${delivery.reconsumeTimes + 1}]`,
    );
  },
};
