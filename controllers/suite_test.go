package controllers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/loopserve/loopserve/api/v1alpha1"
)

// The suite shares one real kube-apiserver + etcd (envtest) and one operator manager running
// the LoopModel reconciler, started once here. Each test works in its own namespace and, when
// it needs NATS, its own embedded server.
var (
	testEnv *envtest.Environment
	cfg     *rest.Config
	k8s     client.Client
	scheme  = runtime.NewScheme()
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
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		fmt.Fprintln(os.Stderr, "building scheme:", err)
		return 1
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		fmt.Fprintln(os.Stderr, "building scheme:", err)
		return 1
	}
	testEnv = &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
	}
	var err error
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

// startOperator runs the manager with short intervals so the suite observes retries, resyncs
// and recoveries in seconds. The returned func stops it and waits for it.
func startOperator() (func(), error) {
	if os.Getenv("LOOPSERVE_TEST_LOG") != "" {
		ctrl.SetLogger(funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{}))
	} else {
		ctrl.SetLogger(logr.Discard())
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  CacheOptions(),
	})
	if err != nil {
		return nil, err
	}
	pool := &NATSPool{DialTimeout: time.Second, ReconnectWait: 100 * time.Millisecond}
	r := &LoopModelReconciler{
		Client:       mgr.GetClient(),
		APIReader:    mgr.GetAPIReader(),
		Events:       mgr.GetEventRecorder("loopserve-operator"),
		NATS:         pool,
		WorkerImage:  testImage,
		PollInterval: 500 * time.Millisecond,
		Resync:       time.Second,
		NATSTimeout:  2 * time.Second,
		RetryBase:    50 * time.Millisecond,
		RetryMax:     500 * time.Millisecond,
	}
	if err := r.SetupWithManager(mgr); err != nil {
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

// TestAPIServerSmoke proves the envtest API server is real: an object written is read back.
func TestAPIServerSmoke(t *testing.T) {
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "smoke", Labels: map[string]string{"loopserve.io/test": "smoke"}}}
	if err := k8s.Create(ctx, ns); err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	var got corev1.Namespace
	if err := k8s.Get(ctx, client.ObjectKey{Name: "smoke"}, &got); err != nil {
		t.Fatalf("reading namespace back: %v", err)
	}
	if got.UID == "" || got.Labels["loopserve.io/test"] != "smoke" {
		t.Errorf("namespace read back = uid %q labels %v, want a server-assigned uid and label smoke", got.UID, got.Labels)
	}
}
