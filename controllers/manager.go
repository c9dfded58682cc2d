package controllers

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/go-logr/logr"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// ManagerOptions configure the operator process: leader election, probe and metrics endpoints,
// and the reconciler's defaults and periods (zero periods take the reconciler's defaults).
type ManagerOptions struct {
	NATSURL      string // default NATS URL for LoopModels that set none
	WorkerImage  string // default worker image
	NATSReplicas int    // default JetStream replicas of work queues and registry buckets (1 when zero)

	MetricsAddr string // Prometheus metrics ("0" disables)
	ProbeAddr   string // /healthz and /readyz ("0" disables)

	LeaderElection          bool
	LeaderElectionID        string // Lease name
	LeaderElectionNamespace string // "" means the pod's namespace

	// WatchNamespaces limits the operator to LoopModels (and the objects it owns) in these
	// namespaces, so Roles there suffice instead of a ClusterRole; empty watches every namespace.
	WatchNamespaces []string

	PollInterval, Resync, NATSTimeout, RetryBase, RetryMax time.Duration
	FinalizerTimeout                                       time.Duration
	StatsWindow, StatsInterval                             time.Duration
	NATSReconnectWait                                      time.Duration

	// SkipNameValidation allows several managers in one process (tests).
	SkipNameValidation bool
}

// NewScheme returns a scheme with the Kubernetes built-in types and LoopModel.
func NewScheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("building scheme: %w", err)
	}
	if err := v1alpha1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("building scheme: %w", err)
	}
	return s, nil
}

// NewManager builds the operator: a controller-runtime manager running the LoopModel
// reconciler, with health and ready checks. Start the manager, then Close the returned pool
// once Start has returned.
func NewManager(cfg *rest.Config, o ManagerOptions) (ctrl.Manager, *NATSPool, error) {
	scheme, err := NewScheme()
	if err != nil {
		return nil, nil, err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                        scheme,
		Metrics:                       metricsserver.Options{BindAddress: o.MetricsAddr},
		HealthProbeBindAddress:        o.ProbeAddr,
		LeaderElection:                o.LeaderElection,
		LeaderElectionID:              o.LeaderElectionID,
		LeaderElectionNamespace:       o.LeaderElectionNamespace,
		LeaderElectionReleaseOnCancel: true,
		Cache:                         CacheOptions(o.WatchNamespaces...),
		Controller:                    config.Controller{SkipNameValidation: &o.SkipNameValidation},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("creating manager: %w", err)
	}
	pool := &NATSPool{ReconnectWait: o.NATSReconnectWait}
	r := &LoopModelReconciler{
		Client:        mgr.GetClient(),
		APIReader:     mgr.GetAPIReader(),
		Events:        mgr.GetEventRecorder("loopserve-operator"),
		NATS:          pool,
		NATSURL:       o.NATSURL,
		WorkerImage:   o.WorkerImage,
		NATSReplicas:  o.NATSReplicas,
		PollInterval:  o.PollInterval,
		Resync:        o.Resync,
		NATSTimeout:   o.NATSTimeout,
		RetryBase:     o.RetryBase,
		RetryMax:      o.RetryMax,
		StatsWindow:   o.StatsWindow,
		StatsInterval: o.StatsInterval,

		FinalizerTimeout: o.FinalizerTimeout,
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return nil, nil, fmt.Errorf("setting up the LoopModel controller: %w", err)
	}
	if o.NATSURL != "" {
		setup := &registrySetup{pool: pool, url: o.NATSURL, replicas: max(o.NATSReplicas, 1), timeout: r.natsTimeout(),
			base: r.retryBase(), max: cmp.Or(r.RetryMax, 2*time.Minute), log: mgr.GetLogger().WithName("registry-setup")}
		if err := mgr.Add(setup); err != nil {
			return nil, nil, fmt.Errorf("adding the registry set-up: %w", err)
		}
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return nil, nil, fmt.Errorf("adding health check: %w", err)
	}
	// Ready once the informers have synced: a fresh leader does not act on an empty cache.
	if err := mgr.AddReadyzCheck("readyz", func(req *http.Request) error {
		ctx, cancel := context.WithTimeout(req.Context(), time.Second)
		defer cancel()
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return errors.New("informer caches not synced")
		}
		return nil
	}); err != nil {
		return nil, nil, fmt.Errorf("adding ready check: %w", err)
	}
	return mgr, pool, nil
}

// registrySetup creates the loopserve_models registry and loopserve_gateways liveness buckets
// on the default NATS (ManagerOptions.NATSURL) when the operator starts, before and whatever
// the outcome of leader election, and before any LoopModel exists: a gateway is ready only once
// it can write its liveness key, so a fresh install (`helm install --wait`) must not wait for the
// first LoopModel. While NATS is unreachable it retries, doubling its pause from base up to max;
// it returns once the buckets exist, when the server refuses the operator's credentials (the
// buckets are then created with the first LoopModel, whose spec may carry credentials), or when
// ctx ends. It never fails the manager and blocks neither the health checks nor the election.
// The reconciler keeps ensuring the buckets for every LoopModel (EnsureRegistry is idempotent),
// so several operator replicas running this at once is harmless.
type registrySetup struct {
	pool     *NATSPool
	url      string
	replicas int
	timeout  time.Duration // of one attempt
	base     time.Duration
	max      time.Duration
	log      logr.Logger
}

// NeedLeaderElection is false: standby operators create the buckets too.
func (s *registrySetup) NeedLeaderElection() bool { return false }

// Start ensures the buckets, retrying until they exist or ctx ends; it always returns nil.
func (s *registrySetup) Start(ctx context.Context) error {
	wait := s.base
	for failures := 0; ; failures++ {
		err := s.ensure(ctx)
		switch {
		case err == nil:
			s.log.Info("registry buckets in place", "natsURL", s.url, "buckets", []string{bus.RegistryBucket, bus.GatewaysBucket})
			return nil
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, nats.ErrAuthorization):
			s.log.Error(err, "cannot create the registry buckets on the default NATS; they are created with the first LoopModel", "natsURL", s.url)
			return nil
		case failures == 0 || wait == s.max:
			// The first failure, then once per longest pause: an outage is not logged every second.
			s.log.Info("NATS not ready for the registry buckets; retrying", "natsURL", s.url, "retryIn", wait, "err", err.Error())
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, s.max)
	}
}

func (s *registrySetup) ensure(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	nc, err := s.pool.Conn(ctx, s.url, nil)
	if err != nil {
		return err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("opening JetStream on %s: %w", s.url, err)
	}
	_, err = bus.EnsureRegistry(ctx, js, s.replicas)
	return err
}
