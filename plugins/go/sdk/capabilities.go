package mqplug

import (
	"fmt"

	types "mqplug/sdk/internal/witgo/types"
	"mqplug/sdk/wit/imports/mqplug_plugin_publish"
	"mqplug/sdk/wit/imports/wasi_config_store"
)

// Config returns the plugin's config value or secret named key
// ([plugin.config] and [plugin.secrets] of its entry), and whether it is
// set.
func Config(key string) (string, bool) {
	defer pause()()
	result := wasi_config_store.Get(key)
	if result.IsErr() {
		return "", false
	}
	value := result.Ok()
	return value.SomeOr(""), value.IsSome()
}

// OptionalConfig is Config for a setting the plugin can do without: unset
// is normal, neither logged by the host nor failed by the kit (mqplug
// test), which both flag a key read with Config that the entry lacks. It
// reads through get-all, so the host sees no request for a missing key.
func OptionalConfig(key string) (string, bool) {
	defer pause()()
	result := wasi_config_store.GetAll()
	if result.IsErr() {
		return "", false
	}
	for _, pair := range result.Ok() {
		if pair.F0 == key {
			return pair.F1, true
		}
	}
	return "", false
}

// Message is a follow-up message, sent after the handler returns nil.
type Message struct {
	// The topic as configured, in the plugin's allowed_topics.
	Topic string
	// The tag, "" for none.
	Tag string
	// Keys besides the one the host sets.
	Keys []string
	Body []byte
}

// Publish puts a follow-up message in this event's outbox. The host sends
// the outbox in order once the handler returns nil, each message with an
// id derived from the plugin, the incoming message and the message itself,
// so a redelivery republishes the same ids.
func Publish(message Message) error {
	defer pause()()
	tag := types.None[string]()
	if message.Tag != "" {
		tag = types.Some(message.Tag)
	}
	keys := message.Keys
	if keys == nil {
		keys = []string{}
	}
	result := mqplug_plugin_publish.Send(mqplug_plugin_publish.Message{
		Topic: message.Topic,
		Tag:   tag,
		Keys:  keys,
		Body:  message.Body,
	})
	if !result.IsErr() {
		return nil
	}
	refused := result.Err()
	switch refused.Tag() {
	case mqplug_plugin_publish.PublishError_TopicNotAllowed:
		return fmt.Errorf("topic %s is not in this plugin's allowed_topics", refused.TopicNotAllowed())
	case mqplug_plugin_publish.PublishError_TooLarge:
		return fmt.Errorf("message over %d bytes", refused.TooLarge())
	default:
		return fmt.Errorf("more than %d messages for one event", refused.TooMany())
	}
}
