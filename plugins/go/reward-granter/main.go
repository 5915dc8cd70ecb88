// Example plugin in Go: grants the points a completed task earns by calling
// the team's rewards service, then announces the grant on
// marketing.reward.granted. Same behaviour as plugins/reward-granter (Rust;
// its header shows the plugin's entry) and the Python and JavaScript ones:
//
//   - Points: 10 per unit of event_data.count (default 1). A count that is
//     not a non-negative integer will not become one on a retry: dead-letter.
//   - POST <rewards_url>/grants (config rewards_url, secret rewards_token)
//     with the message id as idempotency-key, through net/http over the
//     host's wasi:http (wasihttp.Client).
//   - 201 or 200: publishes the grant with tag REWARD_GRANTED. 429 or 503:
//     retry no sooner than the service's retry-after seconds (default 30 s).
//     400: dead-letter. Any other status, or no answer: retry.
//   - With config dedupe_bucket (a bucket its key_value entry grants): the
//     grant is done once per message id (mqplug.Once).
//
// Build: bash scripts/build-guest-plugins.sh.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"mqplug/sdk"
	"mqplug/sdk/wasihttp"
)

const grantedTopic = "marketing.reward.granted"

func init() {
	mqplug.Handle(grant)
}

func grant(event mqplug.Event, delivery mqplug.Delivery) error {
	var data map[string]json.RawMessage
	if err := event.Data(&data); err != nil {
		return fmt.Errorf("event-data is not valid JSON: %w", err)
	}
	count := uint64(1)
	if raw, ok := data["count"]; ok {
		parsed, err := strconv.ParseUint(string(raw), 10, 64)
		if err != nil {
			return mqplug.DeadLetter(fmt.Sprintf("event_data.count must be a non-negative integer, got %s", raw))
		}
		count = parsed
	}
	points := count * 10
	if count > math.MaxUint64/10 {
		points = math.MaxUint64
	}
	url, ok := mqplug.Config("rewards_url")
	if !ok {
		return fmt.Errorf("config rewards_url is not set")
	}
	token, ok := mqplug.Config("rewards_token")
	if !ok {
		return fmt.Errorf("secret rewards_token is not set")
	}

	var answer []byte
	how := ""
	if bucket, _ := mqplug.OptionalConfig("dedupe_bucket"); bucket != "" {
		done, err := mqplug.NewOnce(bucket).Run(delivery.MessageID, func() ([]byte, error) {
			answer, _, err := requestGrant(url, token, event, points, delivery.MessageID)
			return answer, err
		})
		if err != nil {
			return err
		}
		answer = done.Value
		if !done.RanNow {
			how = ", recorded before"
		}
	} else {
		var err error
		if answer, how, err = requestGrant(url, token, event, points, delivery.MessageID); err != nil {
			return err
		}
	}
	var reply any
	if err := json.Unmarshal(answer, &reply); err != nil {
		return fmt.Errorf("rewards service sent no JSON: %w", err)
	}
	// A grant id that is not text is none, as in the other languages.
	var granted struct{ GrantID string }
	if fields, ok := reply.(map[string]any); ok {
		granted.GrantID, _ = fields["grant_id"].(string)
	}
	announcement, _ := json.Marshal(map[string]any{
		"grant_id":    granted.GrantID,
		"user_id":     event.UserID,
		"points":      points,
		"campaign_id": event.CampaignID,
		"message_id":  delivery.MessageID,
	})
	// No grant id (a service that sent none): no key, rather than an empty
	// one, which the host refuses.
	var keys []string
	if granted.GrantID != "" {
		keys = []string{granted.GrantID}
	}
	if err := mqplug.Publish(mqplug.Message{
		Topic: grantedTopic,
		Tag:   "REWARD_GRANTED",
		Keys:  keys,
		Body:  announcement,
	}); err != nil {
		return err
	}
	mqplug.Info(fmt.Sprintf("granted %d points to user %d in campaign %s (grant %s%s)",
		points, event.UserID, event.CampaignID, granted.GrantID, how))
	return nil
}

// requestGrant asks the rewards service for the grant; its JSON, and how
// it was answered for the log.
func requestGrant(url, token string, event mqplug.Event, points uint64, messageID string) ([]byte, string, error) {
	body, _ := json.Marshal(map[string]any{
		"user_id":     event.UserID,
		"points":      points,
		"campaign_id": event.CampaignID,
	})
	request, err := http.NewRequest("POST", strings.TrimRight(url, "/")+"/grants", bytes.NewReader(body))
	if err != nil {
		return nil, "", fmt.Errorf("rewards service: %w", err)
	}
	request.Header.Set("content-type", "application/json")
	request.Header.Set("authorization", "Bearer "+token)
	request.Header.Set("idempotency-key", messageID)
	response, err := wasihttp.Client.Do(request)
	if err != nil {
		return nil, "", fmt.Errorf("rewards service: %w", err)
	}
	defer response.Body.Close()
	answer, err := io.ReadAll(response.Body)
	if err != nil {
		return nil, "", fmt.Errorf("rewards service: %w", err)
	}
	switch response.StatusCode {
	case 201:
		return answer, "", nil
	case 200:
		return answer, ", already granted before", nil
	case 429, 503:
		seconds := uint64(30)
		if value, err := strconv.ParseUint(strings.TrimSpace(response.Header.Get("retry-after")), 10, 64); err == nil {
			seconds = value
		}
		delay := time.Duration(math.MaxInt64)
		if seconds < uint64(math.MaxInt64/int64(time.Second)) {
			delay = time.Duration(seconds) * time.Second
		}
		return nil, "", mqplug.RetryAfter(delay, fmt.Sprintf("rewards service busy (%d)", response.StatusCode))
	case 400:
		return nil, "", mqplug.DeadLetter("rewards service refused the grant: " + string(answer))
	default:
		return nil, "", fmt.Errorf("rewards service answered %d", response.StatusCode)
	}
}

func main() {}
