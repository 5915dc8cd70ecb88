// {{name}}: an mqplug plugin. It handles the marketing platform's task
// events (TaskEventMessage on marketing.task.completed).
//
// Returning nil acknowledges the message. An error retries it on the
// broker's schedule; mqplug.RetryAfter(delay, reason) no sooner than a
// delay; mqplug.DeadLetter(reason) sends it to the dead-letter queue now.
// A panic is recovered, logged and retried.
package main

import (
	"fmt"

	"mqplug/sdk"
)

func init() {
	mqplug.Handle(func(event mqplug.Event, delivery mqplug.Delivery) error {
		if event.TenantID == "" {
			// No retry will give the event a tenant.
			return mqplug.DeadLetter("no tenant")
		}
		mqplug.Info(fmt.Sprintf("%s by user %d in campaign %s, attempt %d",
			event.EventType, event.UserID, event.CampaignID, delivery.ReconsumeTimes+1))
		return nil
	})
}

func main() {}
