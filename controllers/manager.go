package controllers

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/loopserve/loopserve/api/v1alpha1"
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
