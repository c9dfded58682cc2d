// Package bus holds the NATS contract shared by the operator, the runtime workers, the gateway
// and `loopserve up`: subject and stream names, the JetStream stream and consumer settings of a
// LoopModel's work queue, and the loopserve_models KV registry entry. Keeping it in one place
// means the operator and `up` create exactly the queues the workers and gateway expect.
//
// It imports NATS only: no Kubernetes and no runtime packages.
package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// RegistryBucket is the JetStream KV bucket that maps "<ns>.<name>" to a ModelEntry.
const RegistryBucket = "loopserve_models"

// ConsumerName is the durable pull consumer that every worker of a LoopModel shares.
const ConsumerName = "workers"

// Defaults for a LoopModel's work-queue stream.
const (
	DefaultMaxQueued = 1024
	DefaultAckWait   = 30 * time.Second
	DefaultDedupe    = 2 * time.Minute
)

// ErrInvalidRef reports a LoopModel reference that is not "<namespace>/<name>" with DNS-label parts.
var ErrInvalidRef = errors.New("invalid LoopModel reference")

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// Ref names one LoopModel. The zero value is invalid; build one with ParseRef or check it with Validate.
type Ref struct {
	Namespace string
	Name      string
}

// ParseRef parses "<namespace>/<name>".
func ParseRef(s string) (Ref, error) {
	ns, name, ok := strings.Cut(s, "/")
	r := Ref{Namespace: ns, Name: name}
	if !ok {
		return Ref{}, fmt.Errorf("%w %q: want <namespace>/<name>", ErrInvalidRef, s)
	}
	return r, r.Validate()
}

// Validate reports whether both parts are DNS labels, which keeps them safe as NATS subject
// tokens and stream names.
func (r Ref) Validate() error {
	for _, p := range []string{r.Namespace, r.Name} {
		if len(p) > 63 || !dnsLabel.MatchString(p) {
			return fmt.Errorf("%w %q: parts must be DNS labels", ErrInvalidRef, r.String())
		}
	}
	return nil
}

// String returns "<namespace>/<name>".
func (r Ref) String() string { return r.Namespace + "/" + r.Name }

// Key is the registry key "<namespace>.<name>".
func (r Ref) Key() string { return r.Namespace + "." + r.Name }

// Stream is the work-queue stream name LOOPSERVE_<NS>_<NAME>, upper-cased. Dashes stay (stream
// names allow them) and "_" only separates: DNS labels hold no "_", so two LoopModels never share
// a stream ("a-b/c" → LOOPSERVE_A-B_C, "a/b-c" → LOOPSERVE_A_B-C).
func (r Ref) Stream() string {
	return "LOOPSERVE_" + strings.ToUpper(r.Namespace+"_"+r.Name)
}

// RequestSubject is where the gateway publishes requests: loopserve.req.<ns>.<name>.
func (r Ref) RequestSubject() string { return "loopserve.req." + r.Key() }

// StatsSubject is where workers publish stats snapshots: loopserve.stats.<ns>.<name>.
func (r Ref) StatsSubject() string { return "loopserve.stats." + r.Key() }

// ControlSubject is where the operator publishes the threshold in force: loopserve.ctl.<ns>.<name>.
func (r Ref) ControlSubject() string { return "loopserve.ctl." + r.Key() }

// QueueOptions sizes a LoopModel's work queue. Zero fields take the defaults above.
type QueueOptions struct {
	MaxQueued     int64         // requests held before publishes are refused (the gateway answers 429)
	AckWait       time.Duration // redelivery after this long without an ack or InProgress heartbeat
	MaxAckPending int           // in-flight requests across all workers: the batch capacity
	Replicas      int           // JetStream stream replicas (1 for a single server)
}

func (o QueueOptions) withDefaults() QueueOptions {
	if o.MaxQueued <= 0 {
		o.MaxQueued = DefaultMaxQueued
	}
	if o.AckWait <= 0 {
		o.AckWait = DefaultAckWait
	}
	if o.MaxAckPending <= 0 {
		o.MaxAckPending = 8
	}
	if o.Replicas <= 0 {
		o.Replicas = 1
	}
	return o
}

// StreamConfig is the WorkQueue stream of a LoopModel: bounded, refusing new requests when full
// (so the gateway can answer 429 rather than silently dropping old ones), with Nats-Msg-Id dedupe.
func StreamConfig(r Ref, o QueueOptions) jetstream.StreamConfig {
	o = o.withDefaults()
	return jetstream.StreamConfig{
		Name:       r.Stream(),
		Subjects:   []string{r.RequestSubject()},
		Retention:  jetstream.WorkQueuePolicy,
		Discard:    jetstream.DiscardNew,
		MaxMsgs:    o.MaxQueued,
		Storage:    jetstream.FileStorage,
		Replicas:   o.Replicas,
		Duplicates: DefaultDedupe,
	}
}

// ConsumerConfig is the durable pull consumer the workers share. MaxAckPending bounds the
// requests in flight to the batch capacity of all workers together.
func ConsumerConfig(o QueueOptions) jetstream.ConsumerConfig {
	o = o.withDefaults()
	return jetstream.ConsumerConfig{
		Durable:       ConsumerName,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       o.AckWait,
		MaxAckPending: o.MaxAckPending,
		MaxDeliver:    -1,
	}
}

// EnsureQueue creates or updates the stream and its consumer; it is idempotent.
func EnsureQueue(ctx context.Context, js jetstream.JetStream, r Ref, o QueueOptions) (jetstream.Consumer, error) {
	s, err := js.CreateOrUpdateStream(ctx, StreamConfig(r, o))
	if err != nil {
		return nil, fmt.Errorf("creating stream %s: %w", r.Stream(), err)
	}
	c, err := s.CreateOrUpdateConsumer(ctx, ConsumerConfig(o))
	if err != nil {
		return nil, fmt.Errorf("creating consumer %s/%s: %w", r.Stream(), ConsumerName, err)
	}
	return c, nil
}

// DeleteQueue removes the stream (and with it the consumer); a missing stream is not an error.
func DeleteQueue(ctx context.Context, js jetstream.JetStream, r Ref) error {
	err := js.DeleteStream(ctx, r.Stream())
	if err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("deleting stream %s: %w", r.Stream(), err)
	}
	return nil
}

// ModelEntry is a LoopModel's record in the registry: what the gateway needs to route and
// validate requests without Kubernetes access.
type ModelEntry struct {
	Namespace     string    `json:"namespace"`
	Name          string    `json:"name"`
	Subject       string    `json:"subject"`
	ContextLength int       `json:"contextLength"`
	ExitThreshold float64   `json:"exitThreshold"`
	MaxSteps      int       `json:"maxSteps"`
	Ready         bool      `json:"ready"`
	Updated       time.Time `json:"updated"`
}

// Ref returns the entry's LoopModel reference.
func (e ModelEntry) Ref() Ref { return Ref{Namespace: e.Namespace, Name: e.Name} }

// ID is the model name clients use in OpenAI requests: "<ns>/<name>".
func (e ModelEntry) ID() string { return e.Ref().String() }

// Registry opens (creating if needed) the loopserve_models KV bucket.
func Registry(ctx context.Context, js jetstream.JetStream) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      RegistryBucket,
		Description: "LoopModels served through loopserve: <ns>.<name> -> entry",
		History:     1,
	})
	if err != nil {
		return nil, fmt.Errorf("opening KV bucket %s: %w", RegistryBucket, err)
	}
	return kv, nil
}

// PutModel writes an entry under its key.
func PutModel(ctx context.Context, kv jetstream.KeyValue, e ModelEntry) error {
	if err := e.Ref().Validate(); err != nil {
		return err
	}
	e.Subject = e.Ref().RequestSubject()
	b, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("encoding registry entry %s: %w", e.ID(), err)
	}
	if _, err := kv.Put(ctx, e.Ref().Key(), b); err != nil {
		return fmt.Errorf("writing registry entry %s: %w", e.ID(), err)
	}
	return nil
}

// DeleteModel removes an entry; a missing key is not an error.
func DeleteModel(ctx context.Context, kv jetstream.KeyValue, r Ref) error {
	err := kv.Delete(ctx, r.Key())
	if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("deleting registry entry %s: %w", r, err)
	}
	return nil
}

// DecodeModel parses a registry value.
func DecodeModel(b []byte) (ModelEntry, error) {
	var e ModelEntry
	if err := json.Unmarshal(b, &e); err != nil {
		return ModelEntry{}, fmt.Errorf("decoding registry entry: %w", err)
	}
	if err := e.Ref().Validate(); err != nil {
		return ModelEntry{}, err
	}
	return e, nil
}
