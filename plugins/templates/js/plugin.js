// {{name}}: an mqplug plugin. It handles the marketing platform's task
// events (`TaskEventMessage` on `marketing.task.completed`).
//
// Returning acknowledges the message. Throwing { tag: 'retry', val: reason }
// retries it on the broker's schedule, { tag: 'retry-after', val: { reason,
// delayMs } } no sooner than a delay, { tag: 'dead-letter', val: reason }
// sends it to the dead-letter queue now. WIT names are camelCase here and a
// u64 (userId) is a BigInt.

import { log } from 'mqplug:plugin/log@0.2.0';

export const handler = {
  handle(event, delivery) {
    if (event.tenantId === '') {
      // No retry will give the event a tenant.
      throw { tag: 'dead-letter', val: 'no tenant' };
    }
    log(
      'info',
      `${event.eventType} by user ${event.userId} in campaign ${event.campaignId}, ` +
        `attempt ${delivery.reconsumeTimes + 1}`,
    );
  },
};
