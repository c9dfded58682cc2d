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

// GatewaysBucket is the JetStream KV bucket of gateway liveness: each running gateway keeps its
// key (its id) fresh every GatewayHeartbeat, and the bucket forgets keys GatewayTTL after their
// last write, so a worker can tell a gateway that is gone (key absent) from one that is only
// reconnecting (key present). A gateway that stops cleanly deletes its key.
const GatewaysBucket = "loopserve_gateways"

// Gateway liveness timing: a gateway rewrites its key every GatewayHeartbeat; GatewayTTL after
// the last write without a new one, it counts as dead.
const (
	GatewayHeartbeat = 3 * time.Second
	GatewayTTL       = 15 * time.Second
)

// ConsumerName is the durable pull consumer that every worker of a LoopModel shares.
const ConsumerName = "workers"

// Defaults for a LoopModel's work-queue stream.
const (
	DefaultMaxQueued = 1024
	DefaultAckWait   = 30 * time.Second
	// DefaultDedupe is the Nats-Msg-Id window: longer than any publish retry of the gateway, so
	// a request published twice during a failover is queued once.
	DefaultDedupe = 2 * time.Minute
	// DefaultMaxAge drops requests queued longer than the gateway's default request timeout:
	// nobody waits for them any more.
	DefaultMaxAge = 10 * time.Minute
	// DefaultMaxDeliver bounds how often one request is handed to a worker. A request that
	// kills its worker each time (a poison request) stops after this many deliveries, and the
	// max-deliveries advisory tells the gateway to answer its client with an error.
	DefaultMaxDeliver = 5
)

// ErrQueueNotFound reports that a LoopModel's stream or consumer does not exist (yet): workers
// and gateways only bind to them, the operator (or `loopserve up`) creates them.
var ErrQueueNotFound = errors.New("work queue not found")

// ErrRegistryNotFound reports that the registry bucket does not exist (yet).
var ErrRegistryNotFound = errors.New("registry bucket not found")

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

// InboxPrefix starts every subject a worker may publish a request's chunks to:
// loopserve.inbox.<gateway id>.<request id>. A worker refuses any other reply subject, so a job
// cannot make it publish into JetStream's API or another model's subjects, and NATS permissions
// can allow workers to publish under this prefix only.
const InboxPrefix = "loopserve.inbox."

// GatewayInbox is the subject prefix of one gateway's replies: loopserve.inbox.<gateway id>.
func GatewayInbox(gateway string) string { return InboxPrefix + gateway }

// ReplySubject is where a gateway receives one request's chunks.
func ReplySubject(gateway, request string) string { return GatewayInbox(gateway) + "." + request }

// ErrInvalidReply reports a reply subject outside loopserve.inbox.<gateway id>.<request id>.
var ErrInvalidReply = errors.New("invalid reply subject")

var subjectToken = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)

// ParseReply checks that subject is loopserve.inbox.<gateway id>.<request id>, with tokens of
// letters, digits, '-' and '_' only (no wildcards), and returns both ids.
func ParseReply(subject string) (gateway, request string, err error) {
	rest, ok := strings.CutPrefix(subject, InboxPrefix)
	gw, req, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 || !subjectToken.MatchString(gw) || !subjectToken.MatchString(req) {
		return "", "", fmt.Errorf("%w %q: want %s<gateway>.<request>", ErrInvalidReply, subject, InboxPrefix)
	}
	return gw, req, nil
}

// ValidGatewayID reports whether id can name a gateway (a single subject token and KV key).
func ValidGatewayID(id string) bool { return subjectToken.MatchString(id) }

// MaxDeliveriesSubject is where JetStream announces that a request of any LoopModel reached
// its consumer's MaxDeliver: $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.workers.
const MaxDeliveriesSubject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.*." + ConsumerName

// MaxDeliveries is JetStream's max-deliveries advisory: the request stored at StreamSeq of
// Stream was delivered Deliveries times without an ack and will not be delivered again.
type MaxDeliveries struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries uint64 `json:"deliveries"`
}

// DecodeMaxDeliveries parses a max-deliveries advisory.
func DecodeMaxDeliveries(b []byte) (MaxDeliveries, error) {
	var a MaxDeliveries
	if err := json.Unmarshal(b, &a); err != nil {
		return MaxDeliveries{}, fmt.Errorf("decoding max-deliveries advisory: %w", err)
	}
	if a.Stream == "" || a.StreamSeq == 0 {
		return MaxDeliveries{}, fmt.Errorf("decoding max-deliveries advisory: no stream or sequence")
	}
	return a, nil
}

// QueueOptions sizes a LoopModel's work queue. Zero fields take the defaults above.
type QueueOptions struct {
	MaxQueued     int64         // requests held before publishes are refused (the gateway answers 429)
	AckWait       time.Duration // redelivery after this long without an ack or InProgress heartbeat
	MaxAckPending int           // in-flight requests across all workers: the batch capacity
	Replicas      int           // JetStream stream replicas: 1 for a single server, 3 or 5 in a cluster
	MaxAge        time.Duration // requests older than this are dropped from the stream
	MaxDeliver    int           // deliveries of one request before it counts as poison
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
	if o.MaxAge <= 0 {
		o.MaxAge = DefaultMaxAge
	}
	if o.MaxDeliver <= 0 {
		o.MaxDeliver = DefaultMaxDeliver
	}
	return o
}

// StreamConfig is the WorkQueue stream of a LoopModel: bounded, refusing new requests when full
// (so the gateway can answer 429 rather than silently dropping old ones), with Nats-Msg-Id dedupe
// and an age limit.
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
		MaxAge:     o.MaxAge,
	}
}

// ConsumerConfig is the durable pull consumer the workers share. MaxAckPending bounds the
// requests in flight to the batch capacity of all workers together; MaxDeliver bounds the
// deliveries of a request that keeps killing its worker.
func ConsumerConfig(o QueueOptions) jetstream.ConsumerConfig {
	o = o.withDefaults()
	return jetstream.ConsumerConfig{
		Durable:       ConsumerName,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       o.AckWait,
		MaxAckPending: o.MaxAckPending,
		MaxDeliver:    o.MaxDeliver,
	}
}

// EnsureQueue creates or updates the stream and its consumer; it is idempotent. It needs
// JetStream admin rights: only the operator and `loopserve up` (and `worker --create-queue`)
// call it. Workers bind with BindQueue, and gateways only publish to the request subject.
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

// BindQueue returns the consumer the workers share, without creating or changing anything. A
// missing stream or consumer is ErrQueueNotFound.
func BindQueue(ctx context.Context, js jetstream.JetStream, r Ref) (jetstream.Consumer, error) {
	c, err := js.Consumer(ctx, r.Stream(), ConsumerName)
	if errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, fmt.Errorf("%w: %s/%s: %w", ErrQueueNotFound, r.Stream(), ConsumerName, err)
	}
	if err != nil {
		return nil, fmt.Errorf("opening consumer %s/%s: %w", r.Stream(), ConsumerName, err)
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
// validate requests without Kubernetes access, and the thresholds in force per quality tier,
// which workers follow (a KV watch) and the gateway stamps into each job.
type ModelEntry struct {
	Namespace     string `json:"namespace"`
	Name          string `json:"name"`
	Subject       string `json:"subject"`
	ContextLength int    `json:"contextLength"`
	Thresholds
	MaxSteps int       `json:"maxSteps"`
	Ready    bool      `json:"ready"`
	Updated  time.Time `json:"updated"`
}

// Ref returns the entry's LoopModel reference.
func (e ModelEntry) Ref() Ref { return Ref{Namespace: e.Namespace, Name: e.Name} }

// ID is the model name clients use in OpenAI requests: "<ns>/<name>".
func (e ModelEntry) ID() string { return e.Ref().String() }

// EnsureRegistry creates the loopserve_models registry bucket and the loopserve_gateways
// liveness bucket, or raises their replicas to at least replicas (0 means 1). It never lowers
// them: other LoopModels on the same NATS may have asked for more. It needs JetStream admin
// rights: only the operator and `loopserve up` call it; gateways and workers use OpenRegistry.
func EnsureRegistry(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	replicas = max(replicas, 1)
	kv, err := ensureBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:      RegistryBucket,
		Description: "LoopModels served through loopserve: <ns>.<name> -> entry",
		History:     1,
		Replicas:    replicas,
	})
	if err != nil {
		return nil, err
	}
	if _, err := EnsureGateways(ctx, js, replicas, GatewayTTL); err != nil {
		return nil, err
	}
	return kv, nil
}

// EnsureGateways creates the loopserve_gateways liveness bucket with keys forgotten ttl after
// their last write, or sets its ttl and raises its replicas. EnsureRegistry calls it with
// GatewayTTL; a gateway's heartbeat must stay well below ttl.
func EnsureGateways(ctx context.Context, js jetstream.JetStream, replicas int, ttl time.Duration) (jetstream.KeyValue, error) {
	return ensureBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:      GatewaysBucket,
		Description: "loopserve gateways alive: <gateway id> -> heartbeat, forgotten after the TTL",
		History:     1,
		TTL:         ttl,
		Replicas:    max(replicas, 1),
	})
}

func ensureBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, cfg.Bucket)
	if err == nil {
		st, err := kv.Status(ctx)
		if err != nil {
			return nil, fmt.Errorf("reading KV bucket %s: %w", cfg.Bucket, err)
		}
		bs, ok := st.(*jetstream.KeyValueBucketStatus)
		if !ok || bs.StreamInfo().Config.Replicas >= cfg.Replicas && bs.TTL() == cfg.TTL {
			return kv, nil
		}
		cfg.Replicas = max(cfg.Replicas, bs.StreamInfo().Config.Replicas)
		if kv, err = js.UpdateKeyValue(ctx, cfg); err != nil {
			return nil, fmt.Errorf("updating KV bucket %s: %w", cfg.Bucket, err)
		}
		return kv, nil
	}
	if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("opening KV bucket %s: %w", cfg.Bucket, err)
	}
	kv, err = js.CreateKeyValue(ctx, cfg)
	if errors.Is(err, jetstream.ErrBucketExists) { // created meanwhile by another operator or up
		kv, err = js.KeyValue(ctx, cfg.Bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("creating KV bucket %s: %w", cfg.Bucket, err)
	}
	return kv, nil
}

// OpenRegistry binds to the loopserve_models bucket without creating or changing it. A missing
// bucket is ErrRegistryNotFound (no LoopModel was registered on this NATS yet).
func OpenRegistry(ctx context.Context, js jetstream.JetStream) (jetstream.KeyValue, error) {
	return openBucket(ctx, js, RegistryBucket)
}

// OpenGateways binds to the loopserve_gateways liveness bucket; a missing bucket is
// ErrRegistryNotFound.
func OpenGateways(ctx context.Context, js jetstream.JetStream) (jetstream.KeyValue, error) {
	return openBucket(ctx, js, GatewaysBucket)
}

func openBucket(ctx context.Context, js jetstream.JetStream, bucket string) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("%w: %s", ErrRegistryNotFound, bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("opening KV bucket %s: %w", bucket, err)
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

// DecodeModel parses a registry value: its reference must be valid, and its thresholds too
// when it names tiers (an entry without any threshold is kept: its model serves at the
// workers' own).
func DecodeModel(b []byte) (ModelEntry, error) {
	var e ModelEntry
	if err := json.Unmarshal(b, &e); err != nil {
		return ModelEntry{}, fmt.Errorf("decoding registry entry: %w", err)
	}
	if err := e.Ref().Validate(); err != nil {
		return ModelEntry{}, err
	}
	if len(e.Tiers) > 0 || e.DefaultTier != "" {
		if err := e.Thresholds.Validate(); err != nil {
			return ModelEntry{}, fmt.Errorf("decoding registry entry %s: %w", e.ID(), err)
		}
	}
	return e, nil
}
