// Package mqplug writes mqplug plugins in Go (mainline Go, GOOS=wasip1):
// a handler for each TaskEventMessage, logging through the host, the
// plugin's config and secrets, and follow-up messages.
//
//	package main
//
//	import "mqplug/sdk"
//
//	func init() {
//		mqplug.Handle(func(event mqplug.Event, delivery mqplug.Delivery) error {
//			mqplug.Info(fmt.Sprintf("%s by user %d", event.EventType, event.UserID))
//			return nil
//		})
//	}
//
//	func main() {}
//
// A handler that returns nil accepts the event (ConsumeSuccess). An error
// retries it on the broker's schedule, unless it is one of [RetryAfter] or
// [DeadLetter]. A panic is recovered: its message is logged through the
// host and the event is retried, never a silent trap.
//
// Outbound HTTP is package mqplug/sdk/wasihttp (net/http over wasi:http).
//
// The bindings under wit/ are generated from the contract (generate.sh)
// and committed: building a plugin needs only Go and the tools
// scripts/install-guest-tools.sh installs.
package mqplug

import (
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	witRuntime "mqplug/sdk/internal/witgo/runtime"
	types "mqplug/sdk/internal/witgo/types"
	handler "mqplug/sdk/wit/exports/export_mqplug_plugin_handler"
	_ "mqplug/sdk/wit/exports/wit_exports" // the component's exports
	"mqplug/sdk/wit/imports/mqplug_plugin_log"
	witTypes "mqplug/sdk/wit/imports/mqplug_plugin_types"
)

// Version is the SDK's version; see the README for the hosts it runs on.
const Version = "0.2.0"

// Event is one TaskEventMessage: a user completed a campaign task.
type Event struct {
	// What happened, e.g. USER_REGISTER; also the message's tag.
	EventType string
	UserID    uint64
	TenantID  string
	AppID     string
	// The campaign's id, e.g. campaign-1, and display name (any Unicode).
	CampaignID   string
	CampaignName string
	// Free-form event data, a JSON object as the platform sent it.
	EventData json.RawMessage
	// When the task was completed, RFC 3339 text as sent.
	Timestamp string
}

// Data decodes the event data into v (a map or a struct of yours).
func (e Event) Data(v any) error {
	return json.Unmarshal(e.EventData, v)
}

// Delivery says where and how the message was delivered.
type Delivery struct {
	// The producer's message id: the same on every redelivery, the key
	// for idempotency.
	MessageID string
	// The wire topic, e.g. marketing_task_completed.
	Topic string
	// The message's tag, "" when it has none.
	Tag  string
	Keys []string
	// 0 on the first delivery, 1 on the first retry, ...
	ReconsumeTimes uint32
	QueueID        uint32
	QueueOffset    int64
	// When the producer created the message.
	BornTimestamp time.Time
}

// HandlerFunc handles one event.
type HandlerFunc func(Event, Delivery) error

// Handle makes f the plugin's handler. Call it from an init function.
func Handle(f HandlerFunc) {
	handler.Handler = func(event witTypes.TaskEvent, delivery witTypes.Delivery) types.Result[types.Unit, witTypes.HandlerError] {
		err := call(f, eventOf(event), deliveryOf(delivery))
		if err == nil {
			return types.Ok[types.Unit, witTypes.HandlerError](types.Unit{})
		}
		return types.Err[types.Unit](handlerError(err))
	}
}

// pause turns garbage collection off for an import whose results the host
// writes into the plugin's memory, until the function it returns is called
// (see internal/witgo/runtime for why): `defer pause()()`.
func pause() (resume func()) {
	return witRuntime.Pause()
}

// call runs f, turning a panic into an error the host logs.
func call(f HandlerFunc, event Event, delivery Delivery) (err error) {
	defer func() {
		if p := recover(); p != nil {
			Error(fmt.Sprintf("panic: %v\n%s", p, debug.Stack()))
			err = fmt.Errorf("the handler panicked: %v", p)
		}
	}()
	return f(event, delivery)
}

func eventOf(e witTypes.TaskEvent) Event {
	return Event{
		EventType:    e.EventType,
		UserID:       e.UserId,
		TenantID:     e.TenantId,
		AppID:        e.AppId,
		CampaignID:   e.CampaignId,
		CampaignName: e.CampaignName,
		EventData:    json.RawMessage(e.EventData),
		Timestamp:    e.Timestamp,
	}
}

func deliveryOf(d witTypes.Delivery) Delivery {
	return Delivery{
		MessageID:      d.MessageId,
		Topic:          d.Topic,
		Tag:            d.Tags.SomeOr(""),
		Keys:           d.Keys,
		ReconsumeTimes: d.ReconsumeTimes,
		QueueID:        d.QueueId,
		QueueOffset:    d.QueueOffset,
		BornTimestamp:  time.UnixMilli(d.BornTimestamp),
	}
}

// RetryAfterError asks for a redelivery no sooner than Delay.
type RetryAfterError struct {
	Delay  time.Duration
	Reason string
}

func (e *RetryAfterError) Error() string {
	return fmt.Sprintf("%s (retry after %s)", e.Reason, e.Delay)
}

// RetryAfter redelivers the message no sooner than delay: RocketMQ's first
// delay level at least that long, 2 h at most. It counts as a retry.
func RetryAfter(delay time.Duration, reason string) error {
	return &RetryAfterError{Delay: delay, Reason: reason}
}

// DeadLetterError sends the message to the dead-letter queue now.
type DeadLetterError struct {
	Reason string
}

func (e *DeadLetterError) Error() string {
	return e.Reason
}

// DeadLetter moves the message to the dead-letter queue now, without
// retries: no retry can help (a poison event).
func DeadLetter(reason string) error {
	return &DeadLetterError{Reason: reason}
}

func handlerError(err error) witTypes.HandlerError {
	var after *RetryAfterError
	var dead *DeadLetterError
	switch {
	case errors.As(err, &dead):
		return witTypes.MakeHandlerErrorDeadLetter(dead.Reason)
	case errors.As(err, &after):
		delay := after.Delay.Milliseconds()
		if delay < 0 {
			delay = 0
		}
		if delay > 1<<32-1 {
			delay = 1<<32 - 1
		}
		return witTypes.MakeHandlerErrorRetryAfter(witTypes.RetryAfter{Reason: after.Reason, DelayMs: uint32(delay)})
	default:
		return witTypes.MakeHandlerErrorRetry(err.Error())
	}
}

// Debug, Info, Warn and Error write one line to the host's log, with the
// plugin's name and the message id.
func Debug(message string) { mqplug_plugin_log.Log(mqplug_plugin_log.Level_Debug, message) }

// Info writes one line at INFO.
func Info(message string) { mqplug_plugin_log.Log(mqplug_plugin_log.Level_Info, message) }

// Warn writes one line at WARN.
func Warn(message string) { mqplug_plugin_log.Log(mqplug_plugin_log.Level_Warn, message) }

// Error writes one line at ERROR.
func Error(message string) { mqplug_plugin_log.Log(mqplug_plugin_log.Level_Error, message) }

// Writer is an io.Writer whose every write is one INFO line of the host's
// log: log.SetOutput(mqplug.Writer{}) sends the standard logger there.
type Writer struct{}

func (Writer) Write(p []byte) (int, error) {
	line := string(p)
	for len(line) > 0 && line[len(line)-1] == '\n' {
		line = line[:len(line)-1]
	}
	Info(line)
	return len(p), nil
}
