// task-consumer consumes TaskEventMessages the way the platform's guide
// shows: a push consumer, clustering, json.Unmarshal into the struct and
// ConsumeRetryLater when that fails. It prints one JSON line per delivery on
// stdout ({"msg_id","tags","keys","reconsume_times","queue_id","event"} or
// {"msg_id",...,"error"} when the body does not decode; with -raw, "body" as
// text instead of "event", for other topics; "traceparent" when the message
// carries one, and with -otlp a span per delivery exported to that
// collector, a child of that context), {"ready":true} once
// started, and shuts down cleanly on SIGTERM, SIGINT or end of stdin.
//
//	task-consumer -nameserver 127.0.0.1:9876 -group marketing-consumer-group
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/apache/rocketmq-client-go/v2"
	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"

	"mqplug.dev/peers/internal/platform"
	"mqplug.dev/peers/internal/tracing"
)

func main() {
	nameServer := flag.String("nameserver", "127.0.0.1:9876", "name server address")
	topic := flag.String("topic", platform.Topic, "topic to subscribe to")
	group := flag.String("group", "marketing-consumer-group", "consumer group")
	fromFirst := flag.Bool("from-first", false, "a new group starts at the first offset, not the last")
	raw := flag.Bool("raw", false, "print each body as text instead of decoding a TaskEventMessage (for other topics)")
	otlp := flag.String("otlp", "", "export a span per delivery to this OTLP/HTTP collector (host:port)")
	flag.Parse()
	platform.QuietClientLogs()
	flush := tracing.Start(*otlp, "task-consumer")
	defer flush()

	options := []consumer.Option{
		consumer.WithNameServer([]string{*nameServer}),
		consumer.WithGroupName(*group),
		consumer.WithConsumerModel(consumer.Clustering),
	}
	if *fromFirst {
		options = append(options, consumer.WithConsumeFromWhere(consumer.ConsumeFromFirstOffset))
	}
	pushConsumer, err := rocketmq.NewPushConsumer(options...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "new consumer:", err)
		os.Exit(1)
	}

	var outMu sync.Mutex
	out := json.NewEncoder(os.Stdout)
	emit := func(line map[string]interface{}) {
		outMu.Lock()
		defer outMu.Unlock()
		_ = out.Encode(line)
	}

	err = pushConsumer.Subscribe(*topic, consumer.MessageSelector{},
		func(ctx context.Context, msgs ...*primitive.MessageExt) (consumer.ConsumeResult, error) {
			for _, msg := range msgs {
				line := map[string]interface{}{
					"msg_id":          msg.MsgId,
					"tags":            msg.GetTags(),
					"keys":            msg.GetKeys(),
					"reconsume_times": msg.ReconsumeTimes,
					"queue_id":        msg.Queue.QueueId,
				}
				if traceparent := msg.GetProperty("traceparent"); traceparent != "" {
					line["traceparent"] = traceparent
				}
				if *otlp != "" {
					tracing.Process(msg, *group).End()
				}
				if *raw {
					line["body"] = string(msg.Body)
					emit(line)
					continue
				}
				var eventMessage platform.TaskEventMessage
				if err := json.Unmarshal(msg.Body, &eventMessage); err != nil {
					line["error"] = err.Error()
					emit(line)
					return consumer.ConsumeRetryLater, err
				}
				line["event"] = eventMessage
				emit(line)
			}
			return consumer.ConsumeSuccess, nil
		})
	if err != nil {
		fmt.Fprintln(os.Stderr, "subscribe:", err)
		os.Exit(1)
	}
	if err := pushConsumer.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "start consumer:", err)
		os.Exit(1)
	}
	emit(map[string]interface{}{"ready": true})

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	stdinClosed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stdinClosed)
	}()
	select {
	case <-stop:
	case <-stdinClosed:
	}
	if err := pushConsumer.Shutdown(); err != nil {
		fmt.Fprintln(os.Stderr, "shutdown:", err)
	}
	emit(map[string]interface{}{"stopped": true})
}
