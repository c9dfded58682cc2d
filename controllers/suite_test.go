package controllers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"
)

// The suite shares one real kube-apiserver + etcd (envtest) and one operator manager running
// the LoopModel reconciler, started once here. Each test works in its own namespace and, when
// it needs NATS, its own embedded server.
var (
	testEnv *envtest.Environment
	cfg     *rest.Config
	k8s     client.Client
)

// testImage is the operator's default worker image in the suite (no pod ever runs).
const testImage = "registry.example/loopserve:test"

func TestMain(m *testing.M) {
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is unset: run the tests with `make test`, which builds the envtest binaries (hack/envtest-assets.sh) and sets it")
		return 1
	}
	scheme, err := NewScheme()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testEnv = &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
	}
	cfg, err = testEnv.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting envtest:", err)
		return 1
	}
	defer func() {
		if err := testEnv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping envtest:", err)
		}
	}()
	k8s, err = client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		fmt.Fprintln(os.Stderr, "creating client:", err)
		return 1
	}
	stop, err := startOperator()
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the operator:", err)
		return 1
	}
	defer stop()
	return m.Run()
}

// The operator's identity in the suite: the ServiceAccount of config/rbac, bound to the
// generated ClusterRole and the leader-election Role. The manager runs impersonating it, so
// every test also proves that the least-privilege RBAC suffices.
const (
	operatorNamespace = "loopserve-system"
	operatorUser      = "system:serviceaccount:loopserve-system:loopserve-operator"
	leaseName         = "loopserve-operator.loopserve.io"
)

// finalizerTimeout is the suite operator's: how long a deletion waits for NATS.
const finalizerTimeout = 10 * time.Second

// probeAddr and metricsAddr are where the suite's operator serves its endpoints.
var probeAddr, metricsAddr string

// startOperator installs config/rbac, then runs the manager as the operator's ServiceAccount
// with leader election and short intervals, so the suite observes retries, resyncs and
// recoveries in seconds. The returned func stops it and waits for it.
func startOperator() (func(), error) {
	if os.Getenv("LOOPSERVE_TEST_LOG") != "" {
		ctrl.SetLogger(funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{}))
	} else {
		ctrl.SetLogger(logr.Discard())
	}
	if err := installRBAC(); err != nil {
		return nil, err
	}
	var err error
	if probeAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	if metricsAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	asOperator := rest.CopyConfig(cfg)
	asOperator.Impersonate = rest.ImpersonationConfig{UserName: operatorUser, Groups: []string{"system:serviceaccounts", "system:authenticated"}}
	mgr, pool, err := NewManager(asOperator, ManagerOptions{
		WorkerImage:             testImage,
		MetricsAddr:             metricsAddr,
		ProbeAddr:               probeAddr,
		LeaderElection:          true,
		LeaderElectionID:        leaseName,
		LeaderElectionNamespace: operatorNamespace,
		PollInterval:            500 * time.Millisecond,
		Resync:                  time.Second,
		NATSTimeout:             2 * time.Second,
		RetryBase:               50 * time.Millisecond,
		RetryMax:                500 * time.Millisecond,
		NATSReconnectWait:       100 * time.Millisecond,
		StatsWindow:             time.Minute,
		StatsInterval:           200 * time.Millisecond,
		FinalizerTimeout:        finalizerTimeout,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			fmt.Fprintln(os.Stderr, "operator manager:", err)
		}
		pool.Close()
	}, nil
}

// installRBAC creates the operator's namespace and applies every manifest of config/rbac.
func installRBAC() error {
	ctx := context.Background()
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: operatorNamespace}}); err != nil {
		return fmt.Errorf("creating namespace %s: %w", operatorNamespace, err)
	}
	files, err := filepath.Glob(filepath.Join("..", "config", "rbac", "*.yaml"))
	if err != nil {
		return err
	}
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		obj := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(b, &obj.Object); err != nil {
			return fmt.Errorf("decoding %s: %w", f, err)
		}
		if err := k8s.Create(ctx, obj); err != nil {
			return fmt.Errorf("applying %s: %w", f, err)
		}
	}
	return nil
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// TestOperatorEndpoints: the operator holds the leader Lease and serves /healthz, /readyz and
// Prometheus metrics that count LoopModel reconciles.
func TestOperatorEndpoints(t *testing.T) {
	ctx := context.Background()
	await(t, waitLong, "leader Lease held", func() error {
		var lease coordinationv1.Lease
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: operatorNamespace, Name: leaseName}, &lease); err != nil {
			return err
		}
		if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
			return fmt.Errorf("lease has no holder: %+v", lease.Spec)
		}
		return nil
	})
	for _, path := range []string{"/healthz", "/readyz"} {
		body, err := httpGet("http://" + probeAddr + path)
		if err != nil {
			t.Errorf("GET %s: %v", path, err)
		} else if body != "ok" {
			t.Errorf("GET %s = %q, want ok", path, body)
		}
	}
	// Reconciles of any earlier test or of this one show up in the controller's metrics.
	srv := startNATS(t)
	ns := newNamespace(t)
	if err := k8s.Create(ctx, newLoopModel(ns, "metered", srv.url())); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "reconcile metrics", func() error {
		body, err := httpGet("http://" + metricsAddr + "/metrics")
		if err != nil {
			return err
		}
		if !strings.Contains(body, `controller_runtime_reconcile_total{controller="loopmodel",result="success"}`) {
			return errors.New("no successful loopmodel reconcile counted")
		}
		return nil
	})
}

func httpGet(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s: %s", resp.Status, b)
	}
	return string(b), nil
}
