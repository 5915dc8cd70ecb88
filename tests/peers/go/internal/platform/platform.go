// Package platform holds what the marketing platform's Go services share: the
// TaskEventMessage struct exactly as TaskTriggerService declares it (Go field
// names, no json tags, so its JSON uses EventType, UserID, ...), and a
// logger that keeps the RocketMQ client's chatter off stdout, which the peers
// reserve for the JSON lines the tests read.
package platform

import (
	"fmt"
	"os"

	"github.com/apache/rocketmq-client-go/v2/rlog"
)

// TaskEventMessage is the event published when a user completes a campaign task.
type TaskEventMessage struct {
	EventType    string
	UserID       int64
	TenantID     string
	AppID        string
	CampaignID   string
	CampaignName string
	EventData    map[string]interface{}
	Timestamp    string
}

// Topic is marketing.task.completed as brokers accept it: they refuse dots.
const Topic = "marketing_task_completed"

type stderrLogger struct{ level int }

var levels = map[string]int{"debug": 0, "info": 1, "warn": 2, "error": 3, "fatal": 4}

func (l *stderrLogger) log(level int, name, msg string, fields map[string]interface{}) {
	if level >= l.level {
		fmt.Fprintf(os.Stderr, "rocketmq-client-go %s: %s %v\n", name, msg, fields)
	}
}

func (l *stderrLogger) Debug(msg string, f map[string]interface{})   { l.log(0, "debug", msg, f) }
func (l *stderrLogger) Info(msg string, f map[string]interface{})    { l.log(1, "info", msg, f) }
func (l *stderrLogger) Warning(msg string, f map[string]interface{}) { l.log(2, "warn", msg, f) }
func (l *stderrLogger) Error(msg string, f map[string]interface{})   { l.log(3, "error", msg, f) }
func (l *stderrLogger) Fatal(msg string, f map[string]interface{}) {
	l.log(4, "fatal", msg, f)
	os.Exit(1)
}
func (l *stderrLogger) Level(level string) {
	if n, ok := levels[level]; ok {
		l.level = n
	}
}
func (l *stderrLogger) OutputPath(string) error { return nil }

// QuietClientLogs sends the client's log lines at warn level and above to stderr.
func QuietClientLogs() {
	rlog.SetLogger(&stderrLogger{level: levels["warn"]})
}
