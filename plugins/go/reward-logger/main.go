// Example plugin in Go: decides the reward a completed task earns and logs
// it. Same behaviour as plugins/reward-logger (Rust), the Python and the
// JavaScript ones: rejects (for redelivery) an event whose `count` in the
// event data is not a non-negative integer, to show how a handler reports
// an error.
//
// Build: bash scripts/build-guest-plugins.sh (go build, then wasm-tools).
package main

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"

	"mqplug/sdk"
)

func init() {
	mqplug.Handle(func(event mqplug.Event, delivery mqplug.Delivery) error {
		var data map[string]json.RawMessage
		if err := event.Data(&data); err != nil {
			return err
		}
		count := uint64(1)
		if raw, ok := data["count"]; ok {
			parsed, err := strconv.ParseUint(string(raw), 10, 64)
			if err != nil {
				return fmt.Errorf("event_data.count must be a non-negative integer, got %s", raw)
			}
			count = parsed
		}
		points := count * 10
		if count > math.MaxUint64/10 {
			points = math.MaxUint64
		}
		mqplug.Info(fmt.Sprintf(
			"%s by user %d in campaign %s (%s): granting %d points [tenant %s, app %s, attempt %d]",
			event.EventType, event.UserID, event.CampaignID, event.CampaignName, points,
			event.TenantID, event.AppID, delivery.ReconsumeTimes+1,
		))
		return nil
	})
}

func main() {}
