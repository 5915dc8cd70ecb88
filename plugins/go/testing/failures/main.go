// Test plugin: fails the way the event type says, so the tests can check
// what the Go SDK makes of each failure.
//
//	PANIC        panics (the SDK recovers, logs and retries)
//	RETRY_AFTER  asks for a redelivery after 90 s
//	DEAD_LETTER  asks for the dead-letter queue now
//	FAIL         returns an ordinary error (retry)
//	CONFIG       logs config key "greeting"
//	anything     accepted
package main

import (
	"errors"
	"fmt"
	"time"

	"mqplug/sdk"
)

func init() {
	mqplug.Handle(func(event mqplug.Event, delivery mqplug.Delivery) error {
		switch event.EventType {
		case "PANIC":
			var users map[string]int
			users["boom"] = 1 // assignment to a nil map
			return nil
		case "RETRY_AFTER":
			return mqplug.RetryAfter(90*time.Second, "the service said busy")
		case "DEAD_LETTER":
			return fmt.Errorf("wrapped: %w", mqplug.DeadLetter("a poison event"))
		case "FAIL":
			return errors.New("failures: asked to fail")
		case "CONFIG":
			greeting, ok := mqplug.Config("greeting")
			mqplug.Info(fmt.Sprintf("greeting %q set %v", greeting, ok))
			return nil
		}
		return nil
	})
}

func main() {}
