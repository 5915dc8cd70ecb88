// task-producer publishes TaskEventMessages the way the platform's
// TaskTriggerService does: a producer in group marketing-producer-group with
// 2 retries, json.Marshal of the struct, SendSync of a message with no tag
// and no keys. It prints one JSON line per event on stdout:
// {"index":i,"msg_id":"...","body":"..."} once sent, {"index":i,"error":"..."}
// when not, and exits 1 if any send failed. With -otlp, each send is a
// span exported to that collector, its context in the message's
// traceparent property (printed as "traceparent").
//
//	task-producer -nameserver 127.0.0.1:9876 -batch edge
//	task-producer -nameserver 127.0.0.1:9876 -batch plain -count 1000
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/apache/rocketmq-client-go/v2"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"mqplug.dev/peers/internal/platform"
	"mqplug.dev/peers/internal/tracing"
)

// edgeEvents are the values a platform event can carry that are easy to get
// wrong: the guide's own example, user ids at the edges of JSON numbers and
// of the Go field type, nil, nested and numeric event data, and a +08:00
// timestamp.
func edgeEvents() []platform.TaskEventMessage {
	base := func(eventType string, userID int64, data map[string]interface{}) platform.TaskEventMessage {
		return platform.TaskEventMessage{
			EventType:    eventType,
			UserID:       userID,
			TenantID:     "tenant1",
			AppID:        "app1",
			CampaignID:   "campaign-1",
			CampaignName: "测试活动",
			EventData:    data,
			Timestamp:    "2026-11-25T14:19:15+08:00",
		}
	}
	return []platform.TaskEventMessage{
		base("USER_REGISTER", 123, map[string]interface{}{"count": 1}),
		base("USER_REGISTER", 0, map[string]interface{}{"count": 1}),
		base("USER_LOGIN", 1<<53+1, map[string]interface{}{"count": 2}),
		base("USER_LOGIN", math.MaxInt64, map[string]interface{}{"count": 3}),
		base("PROFILE_COMPLETED", 42, nil),
		base("ORDER_PAID", 43, map[string]interface{}{
			"order": map[string]interface{}{
				"id":    "o-1",
				"items": []interface{}{map[string]interface{}{"sku": "a", "qty": 2}, "gift"},
				"paid":  true,
				"note":  nil,
			},
		}),
		base("ORDER_PAID", 44, map[string]interface{}{
			"amount_fen": int64(math.MaxInt64),
			"big":        uint64(math.MaxUint64),
			"above_2_53": int64(1<<53 + 1),
			"negative":   int64(math.MinInt64),
			"ratio":      0.1,
			"tiny":       5e-324,
		}),
		{
			EventType:    "CHECK_IN",
			UserID:       45,
			TenantID:     "租户-二",
			AppID:        "app\"quoted\"\n",
			CampaignID:   "campaign-🎉",
			CampaignName: "测试活动 <b>&amp;</b>",
			EventData:    map[string]interface{}{},
			Timestamp:    time.Date(2026, 11, 27, 9, 30, 0, 0, time.FixedZone("CST", 8*3600)).Format("2006-01-02T15:04:05Z07:00"),
		},
	}
}

func plainEvents(count int) []platform.TaskEventMessage {
	events := make([]platform.TaskEventMessage, count)
	for i := range events {
		events[i] = platform.TaskEventMessage{
			EventType:    "USER_REGISTER",
			UserID:       int64(i),
			TenantID:     "tenant1",
			AppID:        "app1",
			CampaignID:   "campaign-1",
			CampaignName: "测试活动",
			EventData:    map[string]interface{}{"count": 1},
			Timestamp:    time.Now().Format("2006-01-02T15:04:05Z07:00"),
		}
	}
	return events
}

func main() {
	nameServer := flag.String("nameserver", "127.0.0.1:9876", "name server address")
	topic := flag.String("topic", platform.Topic, "topic to publish to")
	batch := flag.String("batch", "edge", "edge: the edge-value events; plain: -count ordinary events")
	count := flag.Int("count", 100, "number of plain events")
	eventType := flag.String("event-type", "", "override every event's EventType")
	otlp := flag.String("otlp", "", "export a span per send to this OTLP/HTTP collector (host:port)")
	flag.Parse()
	platform.QuietClientLogs()
	flush := tracing.Start(*otlp, "task-producer")
	defer flush()

	var events []platform.TaskEventMessage
	switch *batch {
	case "edge":
		events = edgeEvents()
	case "plain":
		events = plainEvents(*count)
	default:
		fmt.Fprintf(os.Stderr, "unknown -batch %q\n", *batch)
		os.Exit(2)
	}

	rmqProducer, err := rocketmq.NewProducer(
		producer.WithNameServer([]string{*nameServer}),
		producer.WithGroupName("marketing-producer-group"),
		producer.WithRetry(2),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "new producer:", err)
		os.Exit(1)
	}
	if err := rmqProducer.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "start producer:", err)
		os.Exit(1)
	}
	defer func() { _ = rmqProducer.Shutdown() }()

	out := json.NewEncoder(os.Stdout)
	failed := 0
	for i, event := range events {
		if *eventType != "" {
			event.EventType = *eventType
		}
		eventJSON, err := json.Marshal(&event)
		if err != nil {
			fmt.Fprintln(os.Stderr, "marshal:", err)
			os.Exit(1)
		}
		msg := primitive.NewMessage(*topic, eventJSON)
		var span trace.Span
		if *otlp != "" {
			span = tracing.Send(msg)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		result, err := rmqProducer.SendSync(ctx, msg)
		cancel()
		switch {
		case err != nil:
			failed++
			_ = out.Encode(map[string]interface{}{"index": i, "error": err.Error()})
		case result.Status != primitive.SendOK:
			failed++
			_ = out.Encode(map[string]interface{}{"index": i, "error": result.String()})
		default:
			_ = out.Encode(map[string]interface{}{"index": i, "msg_id": result.MsgID, "body": string(eventJSON),
				"traceparent": msg.GetProperty("traceparent")})
		}
		if span != nil {
			span.SetAttributes(attribute.String("messaging.message.id", msg.GetProperty(primitive.PropertyUniqueClientMessageIdKeyIndex)))
			span.End()
		}
	}
	if failed > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d sends failed\n", failed, len(events))
		flush()
		os.Exit(1)
	}
}
