package e2e

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/internal/cluster"
	"github.com/loopserve/loopserve/internal/nodeagent"
	"github.com/loopserve/loopserve/internal/podnet"
	"github.com/loopserve/loopserve/runtime/serve"
)

// requiredEnv, set to 1 (as .ci/run does), turns a missing prerequisite into a failure: CI must
// run these tests, not skip them.
const requiredEnv = "LOOPSERVE_E2E_REQUIRED"

// env is the one-machine cluster every test of the package shares, set up once by TestMain.
var env *harness

// skipReason says why the package cannot run here; empty when env is set up.
var skipReason string

// harness is a control plane (internal/cluster), two node agents on one pod network (one
// advertising an nvidia.com/gpu), and a NATS server with JetStream on the host, listening on the
// pod network's bridge so pods reach it. The chart, the operator, the gateway and the workers
// are what the tests install; every container runs the loopserve binary built here.
//
// Ownership: TestMain owns all of it and stops it after the tests; the tests own what they
// install and remove it.
type harness struct {
	dir        string // everything on disk: binary, cluster, agents, NATS store, model folder
	bin        string // the loopserve binary the agents run for every container
	kubectl    string
	helm       string
	kubeconfig string

	net      *podnet.Network
	cluster  *cluster.Cluster
	nats     *server.Server
	natsURL  string // as pods (and the host) reach it: the bridge's address
	agents   []*nodeagent.Agent
	nodeDirs []string // each agent's Options.Dir

	kube kubernetes.Interface
	k8s  client.Client // with the LoopModel types
}

func TestMain(m *testing.M) {
	flag.Parse()
	skipReason = prerequisites()
	if skipReason != "" {
		fmt.Printf("e2e: the end-to-end tests cannot run here: %s\n", skipReason)
		os.Exit(m.Run())
	}
	h, err := setUp()
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: setting up the cluster: %v\n", err)
		if h != nil {
			h.tearDown()
		}
		os.Exit(1)
	}
	env = h
	code := m.Run()
	// As the other suites do with envtest, a component slow to stop is reported, not failed:
	// on a loaded machine kube-apiserver can outlast envtest's stop timeout (it is then killed).
	clean := true
	if err := h.tearDown(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: tearing down: %v\n", err)
		clean = false
	}
	if code == 0 && clean {
		_ = os.RemoveAll(h.dir)
	} else {
		fmt.Fprintf(os.Stderr, "e2e: logs and state kept in %s\n", h.dir)
	}
	os.Exit(code)
}

// need returns the shared cluster, skipping the test when this machine cannot run it (failing
// instead when LOOPSERVE_E2E_REQUIRED=1).
func need(t *testing.T) *harness {
	t.Helper()
	if skipReason != "" {
		if os.Getenv(requiredEnv) == "1" {
			t.Fatalf("%s=1 but the end-to-end tests cannot run: %s", requiredEnv, skipReason)
		}
		t.Skip(skipReason)
	}
	return env
}

// prerequisites returns why the package cannot run on this machine, or "".
func prerequisites() string {
	if testing.Short() {
		return "-short"
	}
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		return "KUBEBUILDER_ASSETS is unset (run `make e2e`, which builds the cluster binaries with hack/envtest-assets.sh --cluster)"
	}
	missing := cluster.Missing(assets)
	if _, err := os.Stat(filepath.Join(assets, "kubectl")); err != nil {
		missing = append(missing, "kubectl")
	}
	if len(missing) > 0 {
		return fmt.Sprintf("%v missing in %s (build them with hack/envtest-assets.sh --cluster)", missing, assets)
	}
	tools := os.Getenv("LOOPSERVE_CHART_TOOLS")
	if tools == "" {
		return "LOOPSERVE_CHART_TOOLS is unset (run `make e2e`, which builds helm with hack/chart-tools.sh)"
	}
	if _, err := os.Stat(filepath.Join(tools, "helm")); err != nil {
		return fmt.Sprintf("helm missing in %s (build it with hack/chart-tools.sh)", tools)
	}
	if err := podnet.Available(); err != nil {
		return fmt.Sprintf("pods need network namespaces: %v", err)
	}
	for _, tool := range []string{"unshare", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Sprintf("the node agent needs %s(8): %v", tool, err)
		}
	}
	return ""
}

// baseDir holds everything the harness writes, under the default temporary folder (/tmp): the
// worker pods mount an emptyDir on /tmp, over the binary and the volume folders the node agent
// keeps there, which it reaches all the same.
func baseDir() (string, error) {
	return os.MkdirTemp("", "loopserve-e2e-")
}

func setUp() (*harness, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	dir, err := baseDir()
	if err != nil {
		return nil, err
	}
	h := &harness{
		dir:     dir,
		bin:     filepath.Join(dir, "bin", "loopserve"),
		kubectl: filepath.Join(assets, "kubectl"),
		helm:    filepath.Join(os.Getenv("LOOPSERVE_CHART_TOOLS"), "helm"),
	}
	start := time.Now()
	if err := buildBinary(ctx, h.bin); err != nil {
		return h, err
	}
	fmt.Printf("e2e: built %s in %s\n", h.bin, time.Since(start).Round(time.Second))

	pid := os.Getpid()
	h.net, err = podnet.New(fmt.Sprintf("lse2e%d", pid%100000), netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 100+pid%50, pid%250)))
	if err != nil {
		return h, fmt.Errorf("creating the pod network: %w", err)
	}
	host := h.net.Gateway()

	natsDir := filepath.Join(dir, "nats")
	h.nats, err = serve.StartNATS(serve.NATSOptions{Host: host.String(), StoreDir: natsDir})
	if err != nil {
		return h, err
	}
	h.natsURL = fmt.Sprintf("nats://%s", net.JoinHostPort(host.String(), fmt.Sprint(h.nats.Addr().(*net.TCPAddr).Port)))

	clusterDir := filepath.Join(dir, "cluster")
	if err := os.MkdirAll(clusterDir, 0o755); err != nil {
		return h, err
	}
	h.cluster, err = cluster.Start(cluster.Options{Assets: assets, Dir: clusterDir, Address: host})
	if err != nil {
		return h, err
	}
	h.kubeconfig = h.cluster.Kubeconfig
	if h.kube, err = kubernetes.NewForConfig(h.cluster.Config); err != nil {
		return h, err
	}
	scheme := runtime.NewScheme()
	if err := errors.Join(clientgoscheme.AddToScheme(scheme), v1alpha1.AddToScheme(scheme)); err != nil {
		return h, err
	}
	if h.k8s, err = client.New(h.cluster.Config, client.Options{Scheme: scheme}); err != nil {
		return h, err
	}

	// Two nodes: a CPU one and one advertising a GPU (it runs the CPU engine: it has none).
	nodes := []struct {
		name string
		gpus int64
	}{{"node-cpu", 0}, {"node-gpu", 1}}
	for _, n := range nodes {
		capacity := corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("8"),
			corev1.ResourceMemory: resource.MustParse("16Gi"),
		}
		if n.gpus > 0 {
			capacity["nvidia.com/gpu"] = *resource.NewQuantity(n.gpus, resource.DecimalSI)
		}
		nodeDir := filepath.Join(dir, "nodes", n.name)
		h.nodeDirs = append(h.nodeDirs, nodeDir)
		a, err := nodeagent.Start(ctx, nodeagent.Options{
			Config:    h.cluster.Config,
			NodeName:  n.name,
			Binary:    h.bin,
			Dir:       nodeDir,
			Network:   h.net,
			Capacity:  capacity,
			APIServer: h.cluster.APIServer,
		})
		if err != nil {
			return h, fmt.Errorf("starting node agent %s: %w", n.name, err)
		}
		h.agents = append(h.agents, a)
	}
	fmt.Printf("e2e: cluster up in %s (API server %s, NATS %s)\n", time.Since(start).Round(time.Second), h.cluster.APIServer, h.natsURL)
	return h, nil
}

// buildBinary builds the loopserve binary as the CPU image does (static, no CUDA).
func buildBinary(ctx context.Context, out string) error {
	root, err := repoRoot()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-tags", "nocuda", "-o", out, "./cmd/loopserve")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building the loopserve binary: %w\n%s", err, b)
	}
	return nil
}

// repoRoot is the module's root, two levels above this package.
func repoRoot() (string, error) {
	return filepath.Abs(filepath.Join("..", ".."))
}

func (h *harness) tearDown() error {
	var errs []error
	for i := len(h.agents) - 1; i >= 0; i-- {
		errs = append(errs, h.agents[i].Stop())
	}
	if h.cluster != nil {
		errs = append(errs, h.cluster.Stop())
	}
	if h.nats != nil {
		h.nats.Shutdown()
		h.nats.WaitForShutdown()
	}
	if h.net != nil {
		errs = append(errs, h.net.Close())
	}
	return errors.Join(errs...)
}

// run runs a command of the quickstart (kubectl or helm, against this cluster) and returns its
// standard output; the error carries both outputs.
func (h *harness) run(ctx context.Context, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(),
		"KUBECONFIG="+h.kubeconfig,
		"HELM_CACHE_HOME="+filepath.Join(h.dir, "helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(h.dir, "helm", "config"),
		"HELM_DATA_HOME="+filepath.Join(h.dir, "helm", "data"),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w\n%s%s", filepath.Base(bin), strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// kubectlT and helmT run kubectl and helm, failing the test on error.
func (h *harness) kubectlT(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	out, err := h.run(ctx, h.kubectl, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (h *harness) helmT(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	out, err := h.run(ctx, h.helm, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// dumpOnFailure prints, when t fails, every pod's status and the logs the agents kept of their
// containers, and the control plane's state through kubectl.
func (h *harness) dumpOnFailure(t *testing.T) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		for _, args := range [][]string{
			{"get", "nodes,pods,deployments,replicasets,loopmodels", "-A", "-o", "wide"},
			{"get", "events", "-A", "--sort-by=.lastTimestamp"},
		} {
			out, err := h.run(ctx, h.kubectl, args...)
			t.Logf("kubectl %s:\n%s%v", strings.Join(args, " "), out, errOrEmpty(err))
		}
		pods, err := h.kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Logf("listing pods: %v", err)
			return
		}
		for _, p := range pods.Items {
			t.Logf("pod %s/%s on %s: phase %s, conditions %v", p.Namespace, p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.Conditions)
			for _, cs := range p.Status.ContainerStatuses {
				t.Logf("  container %s: ready %v, restarts %d, state %+v, last %+v", cs.Name, cs.Ready, cs.RestartCount, cs.State, cs.LastTerminationState)
			}
		}
		// The agents' and the control plane's own logs, then every container log the agents kept (nodeagent.Agent.LogPath: under each node's logs
		// folder), deleted pods included.
		own, _ := filepath.Glob(filepath.Join(h.dir, "cluster", "*.log"))
		for _, dir := range h.nodeDirs {
			own = append(own, filepath.Join(dir, "agent.log"))
		}
		for _, path := range own {
			if b, err := os.ReadFile(path); err == nil {
				t.Logf("log %s:\n%s", path, tail(b, 4000))
			}
		}
		for _, dir := range h.nodeDirs {
			_ = filepath.WalkDir(filepath.Join(dir, "logs"), func(path string, d os.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return nil
				}
				b, err := os.ReadFile(path)
				if err != nil {
					return nil
				}
				t.Logf("log %s:\n%s", path, tail(b, 6000))
				return nil
			})
		}
	})
}

func errOrEmpty(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// tail is the last n bytes of b.
func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
