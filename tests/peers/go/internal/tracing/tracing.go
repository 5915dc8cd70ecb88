// Package tracing gives the peers the OpenTelemetry setup a platform service
// has: spans exported over OTLP/HTTP, and the W3C trace context carried in a
// RocketMQ message's properties (traceparent, tracestate), the way the
// platform can set them from Go.
package tracing

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
)

// Start exports spans to the collector at endpoint (host:port, OTLP/HTTP) as
// service; the returned function flushes them. With an empty endpoint
// nothing is recorded and the function does nothing.
func Start(endpoint, service string) func() {
	otel.SetTextMapPropagator(propagation.TraceContext{})
	if endpoint == "" {
		return func() {}
	}
	exporter, err := otlptracehttp.New(context.Background(),
		otlptracehttp.WithEndpoint(endpoint), otlptracehttp.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "otlp exporter:", err)
		os.Exit(1)
	}
	provider := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exporter),
		sdktrace.WithResource(resource.NewSchemaless(semconv.ServiceName(service))),
	)
	otel.SetTracerProvider(provider)
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := provider.Shutdown(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "flush spans:", err)
		}
	}
}

// properties reads and writes a message's properties as a propagation
// carrier.
type properties struct{ msg *primitive.Message }

func (p properties) Get(key string) string { return p.msg.GetProperty(key) }
func (p properties) Set(key, value string) { p.msg.WithProperty(key, value) }
func (p properties) Keys() []string {
	keys := make([]string, 0, 2)
	for _, key := range []string{"traceparent", "tracestate"} {
		if p.msg.GetProperty(key) != "" {
			keys = append(keys, key)
		}
	}
	return keys
}

func attributes(operation, topic, group string) []attribute.KeyValue {
	kvs := []attribute.KeyValue{
		attribute.String("messaging.system", "rocketmq"),
		attribute.String("messaging.operation.type", operation),
		attribute.String("messaging.destination.name", topic),
	}
	if group != "" {
		kvs = append(kvs, attribute.String("messaging.consumer.group.name", group))
	}
	return kvs
}

// Send starts the producer span of msg and writes its context into msg's
// properties; end it once sent.
func Send(msg *primitive.Message) trace.Span {
	ctx, span := otel.Tracer("task-producer").Start(context.Background(), "send "+msg.Topic,
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(attributes("send", msg.Topic, "")...))
	otel.GetTextMapPropagator().Inject(ctx, properties{msg})
	return span
}

// Process starts the consumer span of msg, a child of the context its
// properties carry; end it once handled.
func Process(msg *primitive.MessageExt, group string) trace.Span {
	ctx := otel.GetTextMapPropagator().Extract(context.Background(), properties{&msg.Message})
	_, span := otel.Tracer("task-consumer").Start(ctx, "process "+msg.Topic,
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(append(attributes("process", msg.Topic, group),
			attribute.String("messaging.message.id", msg.MsgId))...))
	return span
}
