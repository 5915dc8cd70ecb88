package mqplug

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	types "mqplug/sdk/internal/witgo/types"
	"mqplug/sdk/wit/imports/mqplug_plugin_dedupe"
	"mqplug/sdk/wit/imports/wasi_keyvalue_atomics"
	"mqplug/sdk/wit/imports/wasi_keyvalue_store"
)

// Bucket is one of the plugin's key-value buckets ([plugin.key_value]
// buckets = [...] in its entry), through the standard wasi:keyvalue.
// Durable: the host's embedded database, or a Redis several hosts share.
type Bucket struct {
	name   string
	bucket *wasi_keyvalue_store.Bucket
}

// OpenBucket opens a bucket the plugin's entry grants. Close it when done:
// the host holds a bounded number of resources for an instance.
func OpenBucket(name string) (*Bucket, error) {
	defer pause()()
	opened := wasi_keyvalue_store.Open(name)
	if opened.IsErr() {
		return nil, fmt.Errorf("bucket %s: %w", name, kvError(opened.Err()))
	}
	return &Bucket{name: name, bucket: opened.Ok()}, nil
}

// Close gives the bucket's handle back to the host.
func (b *Bucket) Close() {
	if b.bucket != nil {
		b.bucket.Drop()
		b.bucket = nil
	}
}

// Get returns the key's value, and whether it is set.
func (b *Bucket) Get(key string) ([]byte, bool, error) {
	defer pause()()
	got := b.bucket.Get(key)
	if got.IsErr() {
		return nil, false, kvError(got.Err())
	}
	value := got.Ok()
	return value.SomeOr(nil), value.IsSome(), nil
}

// Set stores value under key.
func (b *Bucket) Set(key string, value []byte) error {
	defer pause()()
	return unitError(b.bucket.Set(key, value))
}

// Delete removes the key; absent is not an error.
func (b *Bucket) Delete(key string) error {
	defer pause()()
	return unitError(b.bucket.Delete(key))
}

// Increment adds delta to the decimal counter under key (absent is 0) and
// returns its new value, as Redis's INCRBY.
func (b *Bucket) Increment(key string, delta uint64) (uint64, error) {
	defer pause()()
	added := wasi_keyvalue_atomics.Increment(b.bucket, key, delta)
	if added.IsErr() {
		return 0, kvError(added.Err())
	}
	return added.Ok(), nil
}

// Keys returns every key of the bucket, page by page.
func (b *Bucket) Keys() ([]string, error) {
	defer pause()()
	var keys []string
	cursor := types.None[uint64]()
	for {
		page := b.bucket.ListKeys(cursor)
		if page.IsErr() {
			return nil, kvError(page.Err())
		}
		keys = append(keys, page.Ok().Keys...)
		cursor = page.Ok().Cursor
		if cursor.IsNone() {
			return keys, nil
		}
	}
}

// Claim sets key to value for ttl if nobody holds it, and says so (held
// false); otherwise it returns the value that holds it, held true. Atomic
// across hosts.
func (b *Bucket) Claim(key string, value []byte, ttl time.Duration) (holder []byte, held bool, err error) {
	defer pause()()
	claimed := mqplug_plugin_dedupe.Claim(b.bucket, key, value, millis(ttl))
	if claimed.IsErr() {
		return nil, false, kvError(claimed.Err())
	}
	found := claimed.Ok()
	return found.SomeOr(nil), found.IsSome(), nil
}

// millis is ttl in whole milliseconds, at least 1 (the host refuses 0).
func millis(ttl time.Duration) uint64 {
	return uint64(max(ttl.Milliseconds(), 1))
}

// SetExpiring sets key to value for ttl, held or not.
func (b *Bucket) SetExpiring(key string, value []byte, ttl time.Duration) error {
	defer pause()()
	return unitError(mqplug_plugin_dedupe.SetExpiring(b.bucket, key, value, millis(ttl)))
}

// Release deletes key only if it holds exactly value, and says whether it
// did.
func (b *Bucket) Release(key string, value []byte) (bool, error) {
	defer pause()()
	released := mqplug_plugin_dedupe.Release(b.bucket, key, value)
	if released.IsErr() {
		return false, kvError(released.Err())
	}
	return released.Ok(), nil
}

// ErrAccessDenied is what opening a bucket the entry does not grant fails
// with.
var ErrAccessDenied = errors.New("access denied: the bucket is not in this plugin's key_value.buckets")

func kvError(err wasi_keyvalue_store.Error) error {
	switch err.Tag() {
	case wasi_keyvalue_store.Error_AccessDenied:
		return ErrAccessDenied
	case wasi_keyvalue_store.Error_NoSuchStore:
		return errors.New("no such store")
	default:
		return errors.New(err.Other())
	}
}

func unitError(result types.Result[types.Unit, wasi_keyvalue_store.Error]) error {
	if result.IsErr() {
		return kvError(result.Err())
	}
	return nil
}

// Once does an effect once per key (a message id), although RocketMQ may
// deliver a message twice and several hosts share its queues; as the Rust
// SDK's Once, with the same keys and values, so a plugin rewritten from
// one language to the other keeps its records.
//
// How: a claim pending:<unique> for the lease (config dedupe_lease_ms,
// default 60 s, above the deadline), the effect, then done: and its result
// for the ttl (7 days). A delivery that finds done: skips the effect; one
// that finds a claim is retried after the lease; a failed effect gives
// back its own claim only. Pass the message id to the service as its
// idempotency key: that closes the window of a host dying between the
// effect and its record.
type Once struct {
	Bucket string
	Lease  time.Duration
	TTL    time.Duration
}

// NewOnce records effects in bucket (granted in key_value.buckets).
func NewOnce(bucket string) Once {
	lease := 60 * time.Second
	if ms, ok := OptionalConfig("dedupe_lease_ms"); ok {
		var parsed int64
		if _, err := fmt.Sscan(ms, &parsed); err == nil && parsed > 0 {
			lease = time.Duration(min(parsed, math.MaxInt64/int64(time.Millisecond))) * time.Millisecond
		}
	}
	return Once{Bucket: bucket, Lease: lease, TTL: 7 * 24 * time.Hour}
}

// Done is what Run found or did: the effect's result, and whether this
// call ran it.
type Done struct {
	Value  []byte
	RanNow bool
}

var claims atomic.Uint64

// Run runs effect unless an earlier delivery did it for key.
func (o Once) Run(key string, effect func() ([]byte, error)) (Done, error) {
	bucket, err := OpenBucket(o.Bucket)
	if err != nil {
		return Done{}, err
	}
	defer bucket.Close()
	claim := []byte(fmt.Sprintf("pending:%x.%x", time.Now().UnixNano(), claims.Add(1)))
	holder, held, err := bucket.Claim(key, claim, o.Lease)
	if err != nil {
		return Done{}, fmt.Errorf("dedupe: %w", err)
	}
	if held {
		if value, ok := bytes.CutPrefix(holder, []byte("done:")); ok {
			return Done{Value: value}, nil
		}
		return Done{}, RetryAfter(o.Lease, fmt.Sprintf(
			"dedupe: %s is being handled by another delivery (or its host died doing it)", key))
	}
	value, err := effect()
	if err != nil {
		// Give this call's claim back so the retry does the effect.
		if _, why := bucket.Release(key, claim); why != nil {
			Warn(fmt.Sprintf("dedupe: %s claim not given back (it ends with its lease): %v", key, why))
		}
		return Done{}, err
	}
	if why := bucket.SetExpiring(key, append([]byte("done:"), value...), o.TTL); why != nil {
		Warn(fmt.Sprintf("dedupe: %s done but not recorded: %v", key, why))
	}
	return Done{Value: value, RanNow: true}, nil
}
