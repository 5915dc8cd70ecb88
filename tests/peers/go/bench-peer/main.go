// bench-peer is the platform's own client as the bar in mqplug's benchmarks:
// rocketmq-client-go v2 with its defaults, the way the platform's guide
// uses it, printing only what a benchmark reads (one JSON line per result),
// so that writing output costs it nothing per message.
//
//	bench-peer drain -nameserver ADDR -topic T -group G -count N
//	    A push consumer (clustering, defaults, from the first offset) that
//	    json.Unmarshals each body into the platform's struct. Prints
//	    {"ready":true} once started and {"drained":N,"rate":R} once N
//	    messages were handled, R in messages per second from the first
//	    handled to the last. With -latency, also one line per message:
//	    {"msg_id":ID,"handled_ns":UNIX_NANOS}. Runs until stdin closes.
//
//	bench-peer produce -nameserver ADDR -topic T -count N -inflight K
//	    N events sent with SendSync from K goroutines (group
//	    marketing-producer-group, 2 retries, as the platform's producer).
//	    Prints {"sent":N,"rate":R} and exits 1 if a send failed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/rocketmq-client-go/v2"
	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"mqplug.dev/peers/internal/platform"
)

var out = struct {
	sync.Mutex
	*json.Encoder
}{Encoder: json.NewEncoder(os.Stdout)}

func emit(line map[string]interface{}) {
	out.Lock()
	defer out.Unlock()
	_ = out.Encode(line)
}

func fail(what string, err error) {
	fmt.Fprintln(os.Stderr, what+":", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bench-peer drain|produce [flags]")
		os.Exit(2)
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	nameServer := flags.String("nameserver", "127.0.0.1:9876", "name server address")
	topic := flags.String("topic", platform.Topic, "topic")
	group := flags.String("group", "bench-go", "consumer group (drain)")
	count := flags.Int("count", 1000, "messages to drain or to send")
	inflight := flags.Int("inflight", 1, "sends in flight (produce)")
	latency := flags.Bool("latency", false, "print each message's id and when it was handled (drain)")
	_ = flags.Parse(os.Args[2:])
	platform.QuietClientLogs()
	switch os.Args[1] {
	case "drain":
		drain(*nameServer, *topic, *group, *count, *latency)
	case "produce":
		produce(*nameServer, *topic, *count, *inflight)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

func drain(nameServer, topic, group string, count int, latency bool) {
	pushConsumer, err := rocketmq.NewPushConsumer(
		consumer.WithNameServer([]string{nameServer}),
		consumer.WithGroupName(group),
		consumer.WithConsumerModel(consumer.Clustering),
		consumer.WithConsumeFromWhere(consumer.ConsumeFromFirstOffset),
	)
	if err != nil {
		fail("new consumer", err)
	}
	var handled atomic.Int64
	var first atomic.Int64
	err = pushConsumer.Subscribe(topic, consumer.MessageSelector{},
		func(ctx context.Context, msgs ...*primitive.MessageExt) (consumer.ConsumeResult, error) {
			for _, msg := range msgs {
				var event platform.TaskEventMessage
				if err := json.Unmarshal(msg.Body, &event); err != nil {
					return consumer.ConsumeRetryLater, err
				}
				now := time.Now().UnixNano()
				first.CompareAndSwap(0, now)
				if latency {
					// The producer's id (UNIQ_KEY), as mqplug reports it.
					id := msg.GetProperty(primitive.PropertyUniqueClientMessageIdKeyIndex)
					if id == "" {
						id = msg.MsgId
					}
					emit(map[string]interface{}{"msg_id": id, "handled_ns": now})
				}
				if handled.Add(1) == int64(count) {
					seconds := float64(now-first.Load()) / 1e9
					emit(map[string]interface{}{"drained": count, "rate": float64(count-1) / max(seconds, 1e-9)})
				}
			}
			return consumer.ConsumeSuccess, nil
		})
	if err != nil {
		fail("subscribe", err)
	}
	if err := pushConsumer.Start(); err != nil {
		fail("start consumer", err)
	}
	emit(map[string]interface{}{"ready": true})
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = pushConsumer.Shutdown()
}

func produce(nameServer, topic string, count, inflight int) {
	rmqProducer, err := rocketmq.NewProducer(
		producer.WithNameServer([]string{nameServer}),
		producer.WithGroupName("marketing-producer-group"),
		producer.WithRetry(2),
	)
	if err != nil {
		fail("new producer", err)
	}
	if err := rmqProducer.Start(); err != nil {
		fail("start producer", err)
	}
	defer func() { _ = rmqProducer.Shutdown() }()
	event := platform.TaskEventMessage{
		EventType:    "USER_REGISTER",
		UserID:       123,
		TenantID:     "tenant1",
		AppID:        "app1",
		CampaignID:   "campaign-1",
		CampaignName: "测试活动",
		EventData:    map[string]interface{}{"count": 1},
		Timestamp:    time.Now().Format("2006-01-02T15:04:05Z07:00"),
	}
	// One unmeasured send: the route lookup, as mqplug's publisher does
	// before it is timed.
	if body, err := json.Marshal(&event); err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, _ = rmqProducer.SendSync(ctx, primitive.NewMessage(topic, body))
		cancel()
	}
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	started := time.Now()
	for range max(inflight, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(count) {
				body, err := json.Marshal(&event)
				if err != nil {
					fail("marshal", err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				result, err := rmqProducer.SendSync(ctx, primitive.NewMessage(topic, body))
				cancel()
				if err != nil || result.Status != primitive.SendOK {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	seconds := time.Since(started).Seconds()
	if failed.Load() > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d sends failed\n", failed.Load(), count)
		os.Exit(1)
	}
	emit(map[string]interface{}{"sent": count, "rate": float64(count) / seconds})
}
