package controllers

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// syncNATS puts the LoopModel's work queue and registry entry in place and publishes the
// threshold in force when it changed. The registry entry is the record of what was published:
// comparing with it keeps the sync idempotent across operator restarts.
func (r *LoopModelReconciler) syncNATS(ctx context.Context, lm *v1alpha1.LoopModel, p *plan, ready bool) error {
	ctx, cancel := context.WithTimeout(ctx, r.natsTimeout())
	defer cancel()
	if old := lm.Status.NATSURL; old != "" && old != p.resolved.NATSURL {
		r.retire(ctx, lm, old, p.creds)
	}
	nc, err := r.NATS.Conn(ctx, p.resolved.NATSURL, p.creds)
	if err != nil {
		return err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("opening JetStream on %s: %w", p.resolved.NATSURL, err)
	}
	if err := checkStreamOwner(ctx, js, ref(lm)); err != nil {
		return err
	}
	replicas := natsReplicas(lm, r.NATSReplicas)
	if _, err := bus.EnsureQueue(ctx, js, ref(lm), queueOptions(lm, replicas)); err != nil {
		return err
	}
	if r.stats != nil {
		if err := r.stats.watch(nc, ref(lm)); err != nil {
			return fmt.Errorf("subscribing to %s: %w", ref(lm).StatsSubject(), err)
		}
	}
	kv, err := bus.EnsureRegistry(ctx, js, replicas)
	if err != nil {
		return err
	}
	want := registryEntry(lm, p.thresholds, ready)
	prev, found, err := getEntry(ctx, kv, ref(lm))
	if err != nil {
		return err
	}
	// Publish before writing the entry: the entry records what was published, so a failed
	// publish is retried on the next reconcile.
	if !found || !prev.Thresholds.Equal(p.thresholds) {
		if err := publishThreshold(ctx, nc, ref(lm), p.thresholds); err != nil {
			return err
		}
		if found {
			r.Events.Eventf(lm, nil, corev1.EventTypeNormal, EventThresholdPublished, "Publish",
				"exit threshold %s published on %s (was %s)", describeThresholds(p.thresholds), ref(lm).ControlSubject(), describeThresholds(prev.Thresholds))
		}
	}
	if !found || !sameEntry(prev, want) {
		want.Updated = time.Now().UTC()
		if err := bus.PutModel(ctx, kv, want); err != nil {
			return err
		}
	}
	return nil
}

// describeThresholds renders thresholds for an event: "0.9", or "0.8 (batch 0.6, gold 0.9,
// standard 0.8)" with tiers.
func describeThresholds(th bus.Thresholds) string {
	if len(th.Tiers) == 0 {
		return fmt.Sprint(th.ExitThreshold)
	}
	var parts []string
	for _, k := range th.TierNames() {
		parts = append(parts, fmt.Sprintf("%s %g", k, th.Tiers[k]))
	}
	return fmt.Sprintf("%g (%s)", th.ExitThreshold, strings.Join(parts, ", "))
}

// publishThreshold sends the thresholds in force to the LoopModel's workers (plain NATS: a
// worker that misses it follows the registry entry, and reads the ConfigMap at its next start).
func publishThreshold(ctx context.Context, nc *nats.Conn, br bus.Ref, th bus.Thresholds) error {
	b, err := json.Marshal(bus.Control{Thresholds: th})
	if err != nil {
		return fmt.Errorf("encoding control message: %w", err)
	}
	if err := nc.Publish(br.ControlSubject(), b); err != nil {
		return fmt.Errorf("publishing threshold on %s: %w", br.ControlSubject(), err)
	}
	if err := nc.FlushWithContext(ctx); err != nil {
		return fmt.Errorf("publishing threshold on %s: %w", br.ControlSubject(), err)
	}
	return nil
}

// retire deletes the queue and registry entry a LoopModel left on the NATS server it used
// before its URL changed. It is best effort: a server that is gone must not block the move.
func (r *LoopModelReconciler) retire(ctx context.Context, lm *v1alpha1.LoopModel, url string, creds []byte) {
	if err := r.deleteNATSState(ctx, lm, url, creds); err != nil {
		r.Events.Eventf(lm, nil, corev1.EventTypeWarning, ReasonNATSError, "Cleanup",
			"left the queue and registry entry on %s behind: %v", url, err)
		return
	}
	r.Events.Eventf(lm, nil, corev1.EventTypeNormal, EventQueueDeleted, "Cleanup",
		"deleted stream %s and registry entry %s on %s after the NATS URL changed", ref(lm).Stream(), ref(lm).Key(), url)
}

// errCredentialsGone reports a deleted LoopModel whose credentials Secret is gone too, with no
// credentials remembered from an earlier reconcile: its NATS state cannot be reached.
var errCredentialsGone = errors.New("the NATS credentials Secret is gone")

// cleanupNATS deletes the stream and registry entry of a LoopModel being deleted, on the
// server that holds them. When the credentials Secret is gone it uses the credentials the
// operator last used for the LoopModel, if it has them.
func (r *LoopModelReconciler) cleanupNATS(ctx context.Context, lm *v1alpha1.LoopModel) error {
	if lm.Annotations[AnnotationSkipNATSCleanup] == "true" {
		return nil
	}
	url := cmp.Or(lm.Status.NATSURL, defaults{NATSURL: r.NATSURL}.resolved(lm).NATSURL)
	if url == "" {
		return nil // never had a queue
	}
	creds, err := r.credentials(ctx, lm)
	if se := (*specError)(nil); errors.As(err, &se) {
		kept, ok := r.creds.Load(ref(lm))
		if !ok {
			return fmt.Errorf("%w: %s", errCredentialsGone, se.msg)
		}
		creds, err = kept.([]byte), nil
	}
	if err != nil {
		return err
	}
	if err := r.deleteNATSState(ctx, lm, url, creds); err != nil {
		return err
	}
	r.Events.Eventf(lm, nil, corev1.EventTypeNormal, EventQueueDeleted, "Cleanup",
		"deleted stream %s and registry entry %s", ref(lm).Stream(), ref(lm).Key())
	return nil
}

func (r *LoopModelReconciler) deleteNATSState(ctx context.Context, lm *v1alpha1.LoopModel, url string, creds []byte) error {
	ctx, cancel := context.WithTimeout(ctx, r.natsTimeout())
	defer cancel()
	nc, err := r.NATS.Conn(ctx, url, creds)
	if err != nil {
		return err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("opening JetStream on %s: %w", url, err)
	}
	kv, err := bus.OpenRegistry(ctx, js)
	switch {
	case errors.Is(err, bus.ErrRegistryNotFound): // nothing registered here
	case err != nil:
		return err
	default:
		if err := bus.DeleteModel(ctx, kv, ref(lm)); err != nil {
			return err
		}
	}
	switch err := checkStreamOwner(ctx, js, ref(lm)); {
	case errors.Is(err, ErrStreamTaken):
		// Another LoopModel's queue under a colliding name: not ours to delete.
	case err != nil:
		return err
	default:
		if err := bus.DeleteQueue(ctx, js, ref(lm)); err != nil {
			return err
		}
	}
	return nil
}

func getEntry(ctx context.Context, kv jetstream.KeyValue, r bus.Ref) (bus.ModelEntry, bool, error) {
	v, err := kv.Get(ctx, r.Key())
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return bus.ModelEntry{}, false, nil
	}
	if err != nil {
		return bus.ModelEntry{}, false, fmt.Errorf("reading registry entry %s: %w", r, err)
	}
	e, err := bus.DecodeModel(v.Value())
	if err != nil {
		// A corrupt entry is rewritten, not fatal.
		return bus.ModelEntry{}, false, nil
	}
	return e, true, nil
}

// sameEntry compares two registry entries, ignoring their write times.
func sameEntry(a, b bus.ModelEntry) bool {
	return a.Thresholds.Equal(b.Thresholds) &&
		a.Namespace == b.Namespace && a.Name == b.Name && a.ContextLength == b.ContextLength &&
		a.MaxSteps == b.MaxSteps && a.Ready == b.Ready
}

// sameThreshold treats thresholds within 1e-9 as equal: they round-trip through JSON.
func sameThreshold(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

// ErrStreamTaken reports a stream name already used by another LoopModel's subject: stream
// names fold dashes into underscores, so "a-b/c" and "a/b-c" map to the same stream, and
// updating it would steal the other model's queue.
var ErrStreamTaken = errors.New("stream name taken by another LoopModel")

func checkStreamOwner(ctx context.Context, js jetstream.JetStream, r bus.Ref) error {
	s, err := js.Stream(ctx, r.Stream())
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading stream %s: %w", r.Stream(), err)
	}
	if subj := s.CachedInfo().Config.Subjects; len(subj) != 1 || subj[0] != r.RequestSubject() {
		return fmt.Errorf("%w: %s serves %v, not %s", ErrStreamTaken, r.Stream(), subj, r.RequestSubject())
	}
	return nil
}
