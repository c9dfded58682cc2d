package main

import (
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/go-logr/logr"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/loopserve/loopserve/controllers"
)

// operatorFlags are the settings of `loopserve operator`.
type operatorFlags struct {
	kubeconfig      string
	natsURL         string
	workerImage     string
	metricsAddr     string
	probeAddr       string
	leaderElect     bool
	leaderElectNS   string
	resync          time.Duration
	natsTimeout     time.Duration
	retryMax        time.Duration
	jsonLogs        bool
	leaderElectID   string
	reconcilePeriod time.Duration
	watchNamespaces []string
	finalizerWait   time.Duration
	natsReplicas    int
}

func newOperatorCmd() *cobra.Command {
	var f operatorFlags
	cmd := &cobra.Command{
		Use:   "operator",
		Short: "Run the LoopModel Kubernetes operator",
		Long: `Reconciles LoopModel resources into runtime Deployments, Services and ConfigMaps, creates their
JetStream work queues and loopserve_models registry entries, and publishes the exit threshold in
force on loopserve.ctl.<ns>.<name>.

At start-up, leader or not, it creates the loopserve_models and loopserve_gateways buckets on
--nats-url (retrying with back-off while NATS is down), so gateways turn ready before any
LoopModel exists.

Runs with leader election (one active replica), serves Prometheus metrics on --metrics-addr and
/healthz and /readyz on --health-probe-addr. A NATS outage marks LoopModels Degraded
(NATSUnreachable) and is retried with backoff; the operator itself keeps running.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runOperator(cmd, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config, then $KUBECONFIG or ~/.kube/config)")
	fl.StringVar(&f.natsURL, "nats-url", os.Getenv("LOOPSERVE_NATS_URL"), "NATS URL for LoopModels that set no spec.nats.url ($LOOPSERVE_NATS_URL)")
	fl.StringVar(&f.workerImage, "worker-image", os.Getenv("LOOPSERVE_WORKER_IMAGE"), "worker image for LoopModels that set no spec.runtime.image ($LOOPSERVE_WORKER_IMAGE)")
	fl.StringVar(&f.metricsAddr, "metrics-addr", ":8080", `address serving Prometheus metrics ("0": none)`)
	fl.StringVar(&f.probeAddr, "health-probe-addr", ":8081", "address serving /healthz and /readyz")
	fl.BoolVar(&f.leaderElect, "leader-elect", true, "elect one active operator through a Lease")
	fl.StringVar(&f.leaderElectNS, "leader-election-namespace", "", "namespace of the Lease (default: the pod's namespace; outside a cluster, the kubeconfig context's)")
	fl.StringVar(&f.leaderElectID, "leader-election-id", "loopserve-operator.loopserve.io", "name of the Lease")
	fl.DurationVar(&f.resync, "resync", 5*time.Minute, "recheck period of a Ready LoopModel (repairs NATS state lost by the server)")
	fl.DurationVar(&f.reconcilePeriod, "poll", 10*time.Second, "recheck period while workers roll out (crash loops do not change the Deployment)")
	fl.DurationVar(&f.natsTimeout, "nats-timeout", 5*time.Second, "bound on one reconcile's NATS calls")
	fl.DurationVar(&f.retryMax, "retry-max", 2*time.Minute, "longest backoff between retries after errors, e.g. while NATS is down")
	fl.BoolVar(&f.jsonLogs, "json-logs", true, "log JSON lines (false: text)")
	fl.IntVar(&f.natsReplicas, "nats-replicas", 1, "JetStream replicas (1, 3 or 5) of the work queues and registry buckets of LoopModels that set no spec.nats.replicas: 3 on a 3-node cluster")
	fl.StringSliceVar(&f.watchNamespaces, "watch-namespaces", nil, "reconcile LoopModels in these namespaces only (comma-separated or repeated), so Roles there suffice instead of a ClusterRole; empty: all namespaces")
	fl.DurationVar(&f.finalizerWait, "finalizer-timeout", 2*time.Minute, "how long a deleted LoopModel waits for NATS to clean up its stream before it is released anyway (with a Warning event)")
	return cmd
}

func runOperator(cmd *cobra.Command, f operatorFlags) error {
	var h slog.Handler = slog.NewJSONHandler(cmd.ErrOrStderr(), nil)
	if !f.jsonLogs {
		h = slog.NewTextHandler(cmd.ErrOrStderr(), nil)
	}
	log := logr.FromSlogHandler(h)
	ctrl.SetLogger(log)
	klog.SetLogger(log)

	if f.natsReplicas != 1 && f.natsReplicas != 3 && f.natsReplicas != 5 {
		return fmt.Errorf("--nats-replicas must be 1, 3 or 5, got %d", f.natsReplicas)
	}
	cfg, err := kubeConfig(f.kubeconfig)
	if err != nil {
		return err
	}
	leaseNS := f.leaderElectNS
	if f.leaderElect && leaseNS == "" {
		if leaseNS, err = leaseNamespace(f.kubeconfig); err != nil {
			return err
		}
	}
	mgr, pool, err := controllers.NewManager(cfg, controllers.ManagerOptions{
		NATSURL:                 f.natsURL,
		WorkerImage:             f.workerImage,
		MetricsAddr:             f.metricsAddr,
		ProbeAddr:               f.probeAddr,
		LeaderElection:          f.leaderElect,
		LeaderElectionID:        f.leaderElectID,
		LeaderElectionNamespace: leaseNS,
		PollInterval:            f.reconcilePeriod,
		Resync:                  f.resync,
		NATSTimeout:             f.natsTimeout,
		RetryMax:                f.retryMax,
		WatchNamespaces:         f.watchNamespaces,
		NATSReplicas:            f.natsReplicas,
		FinalizerTimeout:        f.finalizerWait,
	})
	if err != nil {
		return err
	}
	defer pool.Close()
	log.Info("operator starting", "natsURL", f.natsURL, "workerImage", f.workerImage, "leaderElection", f.leaderElect, "watchNamespaces", f.watchNamespaces)
	if err := mgr.Start(cmd.Context()); err != nil {
		return fmt.Errorf("running manager: %w", err)
	}
	return nil
}

// kubeConfig loads the given kubeconfig file, or the usual chain (in-cluster, $KUBECONFIG,
// ~/.kube/config) when path is empty.
func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		cfg, err := ctrl.GetConfig()
		if err != nil {
			return nil, fmt.Errorf("loading Kubernetes config: %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig %s: %w", path, err)
	}
	return cfg, nil
}

// inClusterNamespace names the pod's namespace; controller-runtime reads it for the Lease.
var inClusterNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// leaseNamespace is where the leader Lease lives when --leader-election-namespace is not given:
// "" in a pod (controller-runtime takes the pod's namespace), else the kubeconfig context's
// namespace ("default" when it names none), so that the operator also runs from a workstation.
func leaseNamespace(kubeconfig string) (string, error) {
	if _, err := os.Stat(inClusterNamespace); err == nil {
		return "", nil
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kubeconfig
	ns, _, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).Namespace()
	if err != nil {
		return "", fmt.Errorf("finding the namespace for the leader Lease (set --leader-election-namespace): %w", err)
	}
	return ns, nil
}
