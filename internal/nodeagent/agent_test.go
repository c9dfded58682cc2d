package nodeagent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"

	"github.com/loopserve/loopserve/internal/cluster"
	"github.com/loopserve/loopserve/internal/podnet"
)

// The tests share one cluster, one pod network and two agents: gpuNode with one nvidia.com/gpu,
// cpuNode without.
const (
	gpuNode = "agent-gpu"
	cpuNode = "agent-cpu"
)

var (
	cl     *cluster.Cluster
	k8s    kubernetes.Interface
	agents = map[string]*Agent{}
	skip   string // why the cluster tests skip; empty when they run
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == helperArg {
		os.Exit(helper(os.Args[2:]))
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if missing := cluster.Missing(assets); assets == "" {
		skip = "KUBEBUILDER_ASSETS is unset: run with `make test` (hack/envtest-assets.sh --cluster builds the control plane)"
	} else if len(missing) > 0 {
		skip = fmt.Sprintf("%s lacks %v: build them with hack/envtest-assets.sh --cluster", assets, missing)
	} else if err := podnet.Available(); err != nil {
		skip = fmt.Sprintf("network namespaces unavailable: %v", err)
	}
	if skip != "" {
		fmt.Println("node agent tests skipped:", skip)
		return m.Run()
	}
	// Under /tmp on purpose, the binary too: TestEmptyDirOverTmp mounts an emptyDir there.
	dir, err := os.MkdirTemp("/tmp", "nodeagent-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	keep := false
	defer func() {
		if keep {
			fmt.Fprintln(os.Stderr, "logs kept in", dir)
			return
		}
		os.RemoveAll(dir)
	}()
	pid := os.Getpid()
	pn, err := podnet.New(fmt.Sprintf("lsna%d", pid%100000), netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 150+pid%50, pid%250)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if err := pn.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "removing the pod network:", err)
		}
	}()
	for _, d := range []string{"cluster", cpuNode, gpuNode} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	binary := filepath.Join(dir, "nodeagent.test")
	if err := copyFile(os.Args[0], binary); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cl, err = cluster.Start(cluster.Options{Assets: assets, Dir: filepath.Join(dir, "cluster"), Address: pn.Gateway()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if err := cl.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping the cluster:", err)
		}
	}()
	k8s = kubernetes.NewForConfigOrDie(cl.Config)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, n := range []struct {
		name string
		gpus string
	}{{cpuNode, ""}, {gpuNode, "1"}} {
		capacity := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("16"), corev1.ResourceMemory: resource.MustParse("32Gi")}
		if n.gpus != "" {
			capacity["nvidia.com/gpu"] = resource.MustParse(n.gpus)
		}
		a, err := Start(ctx, Options{
			Config: cl.Config, NodeName: n.name, Binary: binary, Dir: filepath.Join(dir, n.name),
			Network: pn, Capacity: capacity, APIServer: cl.APIServer,
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err, cl.Err())
			keep = true
			return 1
		}
		agents[n.name] = a
	}
	code := m.Run()
	for _, a := range agents {
		if err := a.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping an agent:", err)
			code = 1
		}
	}
	keep = code != 0
	return code
}

func needCluster(t *testing.T) {
	t.Helper()
	if skip != "" {
		t.Skip(skip)
	}
}

// await polls cond until it holds, failing the test (with the pods' logs) when a control-plane
// component exits or two minutes pass.
func await(t *testing.T, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	var last error
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		if err := cl.Err(); err != nil {
			return false, err
		}
		ok, err := cond(ctx)
		if err != nil {
			last = err
		}
		return ok, nil
	})
	if err != nil {
		t.Fatalf("awaiting %s: %v (last error: %v)", what, err, last)
	}
}

// namespace creates a namespace for one test and waits for its default ServiceAccount.
func namespace(t *testing.T) string {
	t.Helper()
	ns, err := k8s.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "na-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, ns.Name)
		}
		_ = k8s.CoreV1().Namespaces().Delete(context.Background(), ns.Name, metav1.DeleteOptions{})
	})
	await(t, "the default ServiceAccount", func(ctx context.Context) (bool, error) {
		_, err := k8s.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	})
	return ns.Name
}

// dumpLogs prints the logs of every container of the namespace's pods.
// copyFile copies the executable src to dst.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	return out.Close()
}

func dumpLogs(t *testing.T, ns string) {
	for _, a := range agents {
		_ = filepath.WalkDir(filepath.Join(a.opts.Dir, "logs", ns), func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				b, _ := os.ReadFile(p)
				t.Logf("--- %s\n%s", p, b)
			}
			return nil
		})
	}
}

// removeMountPoints removes, once the test's pods are gone, the empty folders the agent made on
// the host as mount points (it leaves any that hold something).
func removeMountPoints(t *testing.T, ns string, paths ...string) {
	t.Cleanup(func() {
		ctx := context.Background()
		if err := k8s.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
			t.Error(err)
		}
		await(t, "the pods removed", func(ctx context.Context) (bool, error) {
			pods, err := k8s.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			return err == nil && len(pods.Items) == 0, err
		})
		for _, p := range paths {
			_ = os.Remove(p)
		}
	})
}

func helperArgs(args ...string) []string { return append([]string{helperArg}, args...) }

func httpProbe(path string, port int) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(int32(port))}},
		PeriodSeconds: 1,
	}
}

func getPod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	return k8s.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// get fetches url from the host and returns the body; a status other than 200 is an error.
func get(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s: %s", url, resp.Status, b)
	}
	return string(b), err
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// TestNodesRegister checks both Nodes: capacity and allocatable, Ready, addresses, and lease
// heartbeats that advance.
func TestNodesRegister(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	for _, name := range []string{cpuNode, gpuNode} {
		n, err := k8s.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		wantGPU := map[string]string{cpuNode: "0", gpuNode: "1"}[name]
		gpu := n.Status.Allocatable["nvidia.com/gpu"]
		got := []string{n.Status.Capacity.Cpu().String(), n.Status.Allocatable.Memory().String(), n.Status.Allocatable.Pods().String(), gpu.String()}
		if diff := cmp.Diff(got, []string{"16", "32Gi", "110", wantGPU}); diff != "" {
			t.Errorf("node %s cpu, memory, pods, gpus (-got +want):\n%s", name, diff)
		}
		if !slices.ContainsFunc(n.Status.Conditions, func(c corev1.NodeCondition) bool {
			return c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue
		}) {
			t.Errorf("node %s is not Ready: %+v", name, n.Status.Conditions)
		}
		wantAddrs := []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: cl.APIServer.Addr().String()}, {Type: corev1.NodeHostName, Address: name}}
		if diff := cmp.Diff(n.Status.Addresses, wantAddrs); diff != "" {
			t.Errorf("node %s addresses (-got +want):\n%s", name, diff)
		}
	}
	leases := k8s.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	first, err := leases.Get(ctx, cpuNode, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	await(t, "a renewed lease", func(ctx context.Context) (bool, error) {
		l, err := leases.Get(ctx, cpuNode, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return l.Spec.RenewTime.After(first.Spec.RenewTime.Time), nil
	})
}

// TestDeploymentServesAndScales runs a Deployment of HTTP servers with a readiness probe: the
// pod becomes Ready with its own IP, which the host reaches; scaling to 2 starts a second
// process on another IP, scaling back to 1 ends one of them.
func TestDeploymentServesAndScales(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](1),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "web", Image: "ignored:latest", Args: helperArgs("serve", ":8080"),
					Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
					ReadinessProbe: httpProbe("/healthz", 8080),
				}}},
			},
		},
	}
	if _, err := k8s.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	readyPods := func(want int) map[string]int { // pod IP -> process id
		t.Helper()
		var pids map[string]int
		await(t, fmt.Sprintf("%d ready pods, each serving on its IP", want), func(ctx context.Context) (bool, error) {
			pods, err := k8s.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			if err != nil {
				return false, err
			}
			pids = map[string]int{}
			for _, p := range pods.Items {
				if p.DeletionTimestamp != nil {
					continue
				}
				if !podReady(&p) || p.Status.PodIP == "" {
					return false, nil
				}
				body, err := get(ctx, "http://"+p.Status.PodIP+":8080/pid")
				if err != nil {
					return false, err
				}
				var pid int
				fmt.Sscan(body, &pid)
				pids[p.Status.PodIP] = pid
			}
			return len(pids) == want, nil
		})
		return pids
	}
	one := readyPods(1)
	pods, err := k8s.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := pods.Items[0]
	if p.Status.Phase != corev1.PodRunning || p.Status.HostIP != cl.APIServer.Addr().String() || len(p.Status.PodIPs) != 1 {
		t.Errorf("pod %s: phase %s, hostIP %s, podIPs %v; want Running, %s, one IP", p.Name, p.Status.Phase, p.Status.HostIP, p.Status.PodIPs, cl.APIServer.Addr())
	}
	var condTypes []corev1.PodConditionType
	for _, c := range p.Status.Conditions {
		if c.Status == corev1.ConditionTrue {
			condTypes = append(condTypes, c.Type)
		}
	}
	slices.Sort(condTypes)
	if diff := cmp.Diff(condTypes, []corev1.PodConditionType{corev1.ContainersReady, corev1.PodInitialized, corev1.PodReadyToStartContainers, corev1.PodScheduled, corev1.PodReady}); diff != "" {
		t.Errorf("true conditions (-got +want):\n%s", diff)
	}
	if cs := p.Status.ContainerStatuses; len(cs) != 1 || cs[0].State.Running == nil || !cs[0].Ready || cs[0].RestartCount != 0 {
		t.Errorf("container statuses %+v, want one running, ready, never restarted", cs)
	}

	scale := func(n int32) {
		t.Helper()
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			s, err := k8s.AppsV1().Deployments(ns).GetScale(ctx, "web", metav1.GetOptions{})
			if err != nil {
				return err
			}
			s.Spec.Replicas = n
			_, err = k8s.AppsV1().Deployments(ns).UpdateScale(ctx, "web", s, metav1.UpdateOptions{})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	scale(2)
	two := readyPods(2)
	for ip, pid := range one {
		if two[ip] != pid {
			t.Errorf("the first pod (%s) changed process: %d then %d", ip, pid, two[ip])
		}
	}
	scale(1)
	await(t, "one pod left", func(ctx context.Context) (bool, error) {
		pods, err := k8s.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		return err == nil && len(pods.Items) == 1, err
	})
	var gone []int
	for _, pid := range two {
		if !alive(pid) {
			gone = append(gone, pid)
		}
	}
	if len(gone) != 1 {
		t.Errorf("after scaling 2 -> 1, %d of the processes %v ended, want 1", len(gone), two)
	}
}

// TestEnvAndVolumes checks what a container sees: literal, expanded and downward env,
// ConfigMap and Secret keys (env, envFrom, files with items and modes), an emptyDir shared with
// another container, a hostPath, a read-only ConfigMap volume, and the service-account token at
// the standard path, usable by an in-cluster client.
func TestEnvAndVolumes(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	if _, err := k8s.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "conf"},
		Data:       map[string]string{"model": "ouro-tiny", "threshold": "0.9"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k8s.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "creds"},
		Data:       map[string][]byte{"token": []byte("s3cret"), "user": []byte("loop")},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := t.TempDir()
	if err := os.WriteFile(filepath.Join(host, "greeting"), []byte("hello from the host"), 0o644); err != nil {
		t.Fatal(err)
	}
	mode := int32(0o600)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "env", Namespace: ns, Labels: map[string]string{"app": "env"}},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{corev1.LabelHostname: cpuNode},
			Containers: []corev1.Container{{
				Name: "main", Image: "loopserve:ignored", Command: []string{"loopserve"}, Args: helperArgs("serve", ":8080"),
				WorkingDir: "/srv/work",
				EnvFrom:    []corev1.EnvFromSource{{Prefix: "CONF_", ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}}}},
				Env: []corev1.EnvVar{
					{Name: "PLAIN", Value: "v1"},
					{Name: "EXPANDED", Value: "$(PLAIN)-$(CONF_model)-$(UNDEFINED)-$$"},
					{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
					{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
					{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
					{Name: "NODE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
					{Name: "APP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels['app']"}}},
					{Name: "THRESHOLD", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}, Key: "threshold"}}},
					{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}, Key: "token"}}},
					{Name: "MISSING", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}, Key: "x", Optional: ptr.To(true)}}},
				},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "conf", MountPath: "/etc/loopserve"},
					{Name: "creds", MountPath: "/var/run/creds"},
					{Name: "scratch", MountPath: "/srv/scratch"},
					{Name: "host", MountPath: "/srv/host", ReadOnly: true},
				},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}, PeriodSeconds: 1},
			}, {
				Name: "side", Image: "loopserve:ignored", Args: helperArgs("serve", ":8081"),
				VolumeMounts:   []corev1.VolumeMount{{Name: "scratch", MountPath: "/data"}},
				ReadinessProbe: httpProbe("/healthz", 8081),
			}},
			Volumes: []corev1.Volume{
				{Name: "conf", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
					LocalObjectReference: corev1.LocalObjectReference{Name: "conf"},
					Items:                []corev1.KeyToPath{{Key: "model", Path: "models/name.txt"}},
				}}},
				{Name: "creds", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "creds", DefaultMode: &mode}}},
				{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: host}}},
			},
		},
	}
	if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	removeMountPoints(t, ns, "/etc/loopserve", "/var/run/creds", "/srv/scratch", "/srv/host", "/srv/work", "/data")
	var ip string
	await(t, "the pod Ready", func(ctx context.Context) (bool, error) {
		p, err := getPod(ctx, ns, "env")
		if err != nil {
			return false, err
		}
		ip = p.Status.PodIP
		return podReady(p), nil
	})
	base := "http://" + ip + ":8080"
	body, err := get(ctx, base+"/env")
	if err != nil {
		t.Fatal(err)
	}
	var env map[string]string
	if err := json.Unmarshal([]byte(body), &env); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"PLAIN": "v1", "EXPANDED": "v1-ouro-tiny-$(UNDEFINED)-$", "POD_NAME": "env", "POD_NAMESPACE": ns, "POD_IP": ip, "NODE": cpuNode,
		"APP": "env", "THRESHOLD": "0.9", "TOKEN": "s3cret", "CONF_model": "ouro-tiny", "CONF_threshold": "0.9", "HOSTNAME": "env",
		"KUBERNETES_SERVICE_HOST": cl.APIServer.Addr().String(), "KUBERNETES_SERVICE_PORT": fmt.Sprint(cl.APIServer.Port()),
	}
	got := map[string]string{}
	for k := range want {
		if v, ok := env[k]; ok {
			got[k] = v
		}
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("environment (-got +want):\n%s", diff)
	}
	if _, ok := env["MISSING"]; ok {
		t.Errorf("MISSING (an optional key of an absent secret) is set: %q", env["MISSING"])
	}

	read := func(base, path string) (string, string) {
		t.Helper()
		resp, err := http.Get(base + "/read?path=" + url.QueryEscape(path))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return "error: " + strings.TrimSpace(string(b)), ""
		}
		return string(b), resp.Header.Get("X-Mode")
	}
	side := "http://" + ip + ":8081"
	if _, err := get(ctx, base+"/write?path="+url.QueryEscape("/srv/scratch/shared")); err != nil {
		t.Fatal(err)
	}
	type file struct{ path, body, mode string }
	var files []file
	for _, f := range []struct{ base, path string }{
		{base, "/etc/loopserve/models/name.txt"},
		{base, "/var/run/creds/token"},
		{base, "/srv/host/greeting"},
		{base, "/var/run/secrets/kubernetes.io/serviceaccount/namespace"},
		{side, "/data/shared"},
	} {
		b, m := read(f.base, f.path)
		files = append(files, file{f.path, b, m})
	}
	wantFiles := []file{
		{"/etc/loopserve/models/name.txt", "ouro-tiny", "644"},
		{"/var/run/creds/token", "s3cret", "600"},
		{"/srv/host/greeting", "hello from the host", "644"},
		{"/var/run/secrets/kubernetes.io/serviceaccount/namespace", ns, "644"},
		{"/data/shared", "written", "644"},
	}
	if diff := cmp.Diff(files, wantFiles, cmp.AllowUnexported(file{})); diff != "" {
		t.Errorf("files (-got +want):\n%s", diff)
	}
	if b, _ := read(base, "/etc/loopserve/threshold"); !strings.HasPrefix(b, "error:") {
		t.Errorf("/etc/loopserve/threshold (a key not among the items) reads %q, want an error", b)
	}
	if _, err := os.Stat("/etc/loopserve/models/name.txt"); err == nil {
		t.Errorf("the ConfigMap's file is visible on the host at /etc/loopserve: the mount leaked")
	}
	for _, path := range []string{"/etc/loopserve/new", "/srv/host/new"} {
		if _, err := get(ctx, base+"/write?path="+url.QueryEscape(path)); err == nil {
			t.Errorf("writing %s (a read-only volume) succeeded", path)
		}
	}
	who, err := get(ctx, base+"/whoami")
	if err != nil {
		t.Fatal(err)
	}
	if want := "system:serviceaccount:" + ns + ":default"; who != want {
		t.Errorf("the in-cluster client authenticated as %q, want %q", who, want)
	}
}

// TestCrashingContainersRestart runs containers that exit 3: their restart count rises and the
// termination message is reported, from the file or from the log tail.
func TestCrashingContainersRestart(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "crash", Namespace: ns},
		Spec: corev1.PodSpec{Containers: []corev1.Container{
			{Name: "file", Image: "loopserve:ignored", Args: helperArgs("exit", "3", "out of loop steps")},
			{Name: "logs", Image: "loopserve:ignored", Args: helperArgs("stderr", "3", "last words"), TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError},
		}},
	}
	if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var p *corev1.Pod
	await(t, "both containers restarted twice", func(ctx context.Context) (bool, error) {
		var err error
		if p, err = getPod(ctx, ns, "crash"); err != nil {
			return false, err
		}
		for _, cs := range p.Status.ContainerStatuses {
			if cs.RestartCount < 2 || cs.LastTerminationState.Terminated == nil {
				return false, nil
			}
		}
		return len(p.Status.ContainerStatuses) == 2, nil
	})
	type term struct {
		Name    string
		Code    int32
		Reason  string
		Message string
	}
	var got []term
	for _, cs := range p.Status.ContainerStatuses {
		tt := cs.LastTerminationState.Terminated
		got = append(got, term{cs.Name, tt.ExitCode, tt.Reason, tt.Message})
	}
	want := []term{{"file", 3, "Error", "out of loop steps"}, {"logs", 3, "Error", "first line\nlast words\n"}}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("last terminations (-got +want):\n%s", diff)
	}
	if p.Status.Phase != corev1.PodRunning {
		t.Errorf("phase %s, want Running (restartPolicy Always)", p.Status.Phase)
	}
}

// TestLivenessProbeRestarts runs a server whose exec liveness probe fails: the agent kills it and
// starts it again.
func TestLivenessProbeRestarts(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "sick", Namespace: ns},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers: []corev1.Container{{
				Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080"),
				LivenessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-e", "/no/such/file"}}},
					PeriodSeconds: 1, FailureThreshold: 2,
				},
			}},
		},
	}
	if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	await(t, "a restart after failed liveness probes", func(ctx context.Context) (bool, error) {
		p, err := getPod(ctx, ns, "sick")
		if err != nil {
			return false, err
		}
		cs := p.Status.ContainerStatuses
		return len(cs) == 1 && cs[0].RestartCount >= 1 && cs[0].LastTerminationState.Terminated != nil, nil
	})
}

// TestDeletionHonoursGracePeriod deletes two pods: one exits on SIGTERM, one ignores it and is
// killed after its grace period; both are then removed from the API server.
func TestDeletionHonoursGracePeriod(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	marks := t.TempDir()
	mk := func(name, mode string, grace int64) {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.PodSpec{
				TerminationGracePeriodSeconds: &grace,
				Containers: []corev1.Container{{
					Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080", "/marks/"+name, mode),
					VolumeMounts:   []corev1.VolumeMount{{Name: "marks", MountPath: "/marks"}},
					ReadinessProbe: httpProbe("/healthz", 8080),
				}},
				Volumes: []corev1.Volume{{Name: "marks", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: marks}}}},
			},
		}
		if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	removeMountPoints(t, ns, "/marks")
	mk("polite", "", 30)
	mk("stubborn", "ignore-term", 5)
	pids := map[string]int{}
	ips := map[string]string{}
	for _, name := range []string{"polite", "stubborn"} {
		await(t, name+" Ready", func(ctx context.Context) (bool, error) {
			p, err := getPod(ctx, ns, name)
			if err != nil || !podReady(p) {
				return false, err
			}
			body, err := get(ctx, "http://"+p.Status.PodIP+":8080/pid")
			if err != nil {
				return false, err
			}
			var pid int
			fmt.Sscan(body, &pid)
			pids[name], ips[name] = pid, p.Status.PodIP
			return true, nil
		})
	}
	for _, name := range []string{"polite", "stubborn"} {
		if err := k8s.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	await(t, "the stubborn pod's SIGTERM", func(ctx context.Context) (bool, error) {
		b, _ := os.ReadFile(filepath.Join(marks, "stubborn"))
		return string(b) == "SIGTERM", nil
	})
	if _, err := get(ctx, "http://"+ips["stubborn"]+":8080/healthz"); err != nil {
		t.Errorf("the stubborn pod stopped serving right after SIGTERM (want it alive until its grace period ends): %v", err)
	}
	for _, name := range []string{"polite", "stubborn"} {
		await(t, name+" removed from the API server", func(ctx context.Context) (bool, error) {
			_, err := getPod(ctx, ns, name)
			return apierrors.IsNotFound(err), nil
		})
		await(t, name+"'s process ended", func(context.Context) (bool, error) { return !alive(pids[name]), nil })
	}
	if b, err := os.ReadFile(filepath.Join(marks, "polite")); string(b) != "SIGTERM" {
		t.Errorf("the polite pod's marker reads %q (%v), want SIGTERM", b, err)
	}
	for _, name := range []string{"polite", "stubborn"} {
		b, err := os.ReadFile(agents[cpuNode].LogPath(ns, name, "main"))
		if err != nil {
			b, err = os.ReadFile(agents[gpuNode].LogPath(ns, name, "main"))
		}
		if err != nil || !strings.Contains(string(b), "got SIGTERM") {
			t.Errorf("%s's log (%v) lacks the SIGTERM line:\n%s", name, err, b)
		}
	}
}

// TestJobsEnd runs a Job that succeeds and one that fails: their pods reach Succeeded and
// Failed, and the Jobs Complete and Failed.
func TestJobsEnd(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	for _, j := range []struct{ name, code string }{{"ok", "0"}, {"bad", "1"}} {
		job := &batchv1.Job{
			ObjectMeta: metav1.ObjectMeta{Name: j.name, Namespace: ns},
			Spec: batchv1.JobSpec{
				BackoffLimit: ptr.To[int32](0),
				Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
					RestartPolicy: corev1.RestartPolicyNever,
					Containers:    []corev1.Container{{Name: "main", Image: "loopserve:ignored", Args: helperArgs("exit", j.code)}},
				}},
			},
		}
		if _, err := k8s.BatchV1().Jobs(ns).Create(ctx, job, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, j := range []struct {
		name  string
		cond  batchv1.JobConditionType
		phase corev1.PodPhase
	}{{"ok", batchv1.JobComplete, corev1.PodSucceeded}, {"bad", batchv1.JobFailed, corev1.PodFailed}} {
		await(t, "job "+j.name+" "+string(j.cond), func(ctx context.Context) (bool, error) {
			job, err := k8s.BatchV1().Jobs(ns).Get(ctx, j.name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			return slices.ContainsFunc(job.Status.Conditions, func(c batchv1.JobCondition) bool {
				return c.Type == j.cond && c.Status == corev1.ConditionTrue
			}), nil
		})
		pods, err := k8s.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "job-name=" + j.name})
		if err != nil {
			t.Fatal(err)
		}
		var phases []corev1.PodPhase
		for _, p := range pods.Items {
			phases = append(phases, p.Status.Phase)
		}
		if diff := cmp.Diff(phases, []corev1.PodPhase{j.phase}); diff != "" {
			t.Errorf("job %s pod phases (-got +want):\n%s", j.name, diff)
		}
	}
}

// TestGPUPodsScheduleOnTheGPUNode runs a pod asking for nvidia.com/gpu: it lands on the node with
// GPU capacity (where it runs on the CPU).
func TestGPUPodsScheduleOnTheGPUNode(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	gpu := corev1.ResourceList{"nvidia.com/gpu": resource.MustParse("1")}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "gpu", Namespace: ns},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080"),
			Resources:      corev1.ResourceRequirements{Requests: gpu, Limits: gpu},
			ReadinessProbe: httpProbe("/healthz", 8080),
		}}},
	}
	if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var p *corev1.Pod
	await(t, "the GPU pod Ready", func(ctx context.Context) (bool, error) {
		var err error
		p, err = getPod(ctx, ns, "gpu")
		return err == nil && podReady(p), err
	})
	if p.Spec.NodeName != gpuNode {
		t.Errorf("the GPU pod runs on %s, want %s", p.Spec.NodeName, gpuNode)
	}
}

// TestKubeletAPI reaches a pod through the API server as kubectl does: logs (tail), exec (in the
// container's environment and working directory) and port-forward.
func TestKubeletAPI(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: ns},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080"),
			Env:            []corev1.EnvVar{{Name: "GREETING", Value: "hello"}},
			WorkingDir:     "/tmp",
			ReadinessProbe: httpProbe("/healthz", 8080),
		}}},
	}
	if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pid string
	await(t, "the pod Ready", func(ctx context.Context) (bool, error) {
		p, err := getPod(ctx, ns, "api")
		if err != nil || !podReady(p) {
			return false, err
		}
		pid, err = get(ctx, "http://"+p.Status.PodIP+":8080/pid")
		return err == nil, err
	})

	logs, err := k8s.CoreV1().Pods(ns).GetLogs("api", &corev1.PodLogOptions{Container: "main", TailLines: ptr.To[int64](1)}).DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logs), `starting [`) || strings.Count(string(logs), "\n") != 1 {
		t.Errorf("the log's last line is %q, want the agent's start line", logs)
	}

	var stdout, stderr strings.Builder
	req := k8s.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name("api").SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: "main", Command: []string{"sh", "-c", "echo $GREETING; pwd"}, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	exe, err := remotecommand.NewSPDYExecutor(cl.Config, http.MethodPost, req.URL())
	if err != nil {
		t.Fatal(err)
	}
	if err := exe.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}); err != nil {
		t.Fatalf("exec: %v (stderr %q)", err, stderr.String())
	}
	if got, want := stdout.String(), "hello\n/tmp\n"; got != want {
		t.Errorf("exec printed %q, want %q", got, want)
	}

	transport, upgrader, err := spdy.RoundTripperFor(cl.Config)
	if err != nil {
		t.Fatal(err)
	}
	pfURL := k8s.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name("api").SubResource("portforward").URL()
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, pfURL)
	stop, ready := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:8080"}, stop, ready, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	fwErr := make(chan error, 1)
	go func() { fwErr <- fw.ForwardPorts() }()
	defer func() { close(stop); <-fwErr }()
	select {
	case <-ready:
	case err := <-fwErr:
		t.Fatalf("port-forward: %v", err)
	}
	ports, err := fw.GetPorts()
	if err != nil {
		t.Fatal(err)
	}
	got, err := get(ctx, fmt.Sprintf("http://127.0.0.1:%d/pid", ports[0].Local))
	if err != nil {
		t.Fatal(err)
	}
	if got != pid {
		t.Errorf("through the port-forward the pod's process is %s, want %s", got, pid)
	}
}

// TestInitContainers runs two init containers in order before the server (any command other
// than loopserve runs as given: here /bin/sh), and fails a pod whose init container fails with
// restartPolicy Never.
func TestInitContainers(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	shared := []corev1.VolumeMount{{Name: "shared", MountPath: "/shared"}}
	sh := func(name, script string) corev1.Container {
		return corev1.Container{Name: name, Image: "busybox", Command: []string{"/bin/sh", "-c", script}, VolumeMounts: shared}
	}
	pods := []*corev1.Pod{{
		ObjectMeta: metav1.ObjectMeta{Name: "init", Namespace: ns},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{sh("one", "echo one >> /shared/order"), sh("two", "echo two >> /shared/order")},
			Containers: []corev1.Container{{
				Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080"), VolumeMounts: shared,
				ReadinessProbe: httpProbe("/healthz", 8080),
			}},
			Volumes: []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
	}, {
		ObjectMeta: metav1.ObjectMeta{Name: "init-fails", Namespace: ns},
		Spec: corev1.PodSpec{
			RestartPolicy:  corev1.RestartPolicyNever,
			InitContainers: []corev1.Container{sh("bad", "echo no model >&2; exit 4")},
			Containers:     []corev1.Container{{Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080")}},
			Volumes:        []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
	}}
	pods[1].Spec.InitContainers[0].TerminationMessagePolicy = corev1.TerminationMessageFallbackToLogsOnError
	for _, p := range pods {
		if _, err := k8s.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var p *corev1.Pod
	await(t, "the pod Ready after its init containers", func(ctx context.Context) (bool, error) {
		var err error
		p, err = getPod(ctx, ns, "init")
		return err == nil && podReady(p), err
	})
	order, err := get(ctx, "http://"+p.Status.PodIP+":8080/read?path=/shared/order")
	if err != nil {
		t.Fatal(err)
	}
	if order != "one\ntwo\n" {
		t.Errorf("the init containers wrote %q, want one then two", order)
	}
	for _, cs := range p.Status.InitContainerStatuses {
		if tt := cs.State.Terminated; tt == nil || tt.ExitCode != 0 || tt.Reason != "Completed" {
			t.Errorf("init container %s: state %+v, want terminated, Completed, exit 0", cs.Name, cs.State)
		}
	}
	await(t, "the pod with a failing init container Failed", func(ctx context.Context) (bool, error) {
		var err error
		p, err = getPod(ctx, ns, "init-fails")
		return err == nil && p.Status.Phase == corev1.PodFailed, err
	})
	cs := p.Status.InitContainerStatuses
	if len(cs) != 1 || cs[0].State.Terminated == nil || cs[0].State.Terminated.ExitCode != 4 || cs[0].State.Terminated.Message != "no model\n" {
		t.Errorf("init container statuses %+v, want one terminated with exit 4 and message %q", cs, "no model\n")
	}
	if main := p.Status.ContainerStatuses; len(main) != 1 || main[0].State.Running != nil || main[0].RestartCount != 0 {
		t.Errorf("container statuses %+v, want main never started", main)
	}
}

// TestClaimsOutliveTheirPods mounts a bound PersistentVolumeClaim (a folder of the node): what
// one pod writes there, the next pod of the claim reads.
func TestClaimsOutliveTheirPods(t *testing.T) {
	needCluster(t)
	ns := namespace(t)
	ctx := context.Background()
	storage := corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "pv-" + ns},
		Spec: corev1.PersistentVolumeSpec{
			Capacity: storage, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeSource: corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: t.TempDir()}},
		},
	}
	if _, err := k8s.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = k8s.CoreV1().PersistentVolumes().Delete(context.Background(), pv.Name, metav1.DeleteOptions{})
	})
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "models", Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:   corev1.VolumeResourceRequirements{Requests: storage}, StorageClassName: ptr.To(""), VolumeName: pv.Name,
		},
	}
	if _, err := k8s.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	removeMountPoints(t, ns, "/claim")
	run := func(name string) string {
		t.Helper()
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.PodSpec{
				NodeSelector: map[string]string{corev1.LabelHostname: cpuNode},
				Containers: []corev1.Container{{
					Name: "main", Image: "loopserve:ignored", Args: helperArgs("serve", ":8080"),
					VolumeMounts:   []corev1.VolumeMount{{Name: "models", MountPath: "/claim"}},
					ReadinessProbe: httpProbe("/healthz", 8080),
				}},
				Volumes: []corev1.Volume{{Name: "models", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "models"}}}},
			},
		}
		if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		var ip string
		await(t, name+" Ready", func(ctx context.Context) (bool, error) {
			p, err := getPod(ctx, ns, name)
			if err != nil {
				return false, err
			}
			ip = p.Status.PodIP
			return podReady(p), nil
		})
		return "http://" + ip + ":8080"
	}
	writer := run("writer")
	if _, err := get(ctx, writer+"/write?path=/claim/weights"); err != nil {
		t.Fatal(err)
	}
	if err := k8s.CoreV1().Pods(ns).Delete(ctx, "writer", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	await(t, "the writer removed", func(ctx context.Context) (bool, error) {
		_, err := getPod(ctx, ns, "writer")
		return apierrors.IsNotFound(err), nil
	})
	reader := run("reader")
	got, err := get(ctx, reader+"/read?path=/claim/weights")
	if err != nil {
		t.Fatal(err)
	}
	if got != "written" {
		t.Errorf("the reader found %q in the claim, want what the writer wrote", got)
	}
}

// TestEmptyDirOverTmp: an emptyDir mounted at /tmp hides the host's /tmp, under which the
// agent keeps its volumes (Options.Dir) and the binary it runs; the configMap mounted elsewhere,
// the termination-message file and the binary must still be reached, the emptyDir must be the
// pod's own, and the host's /tmp and /etc untouched.
func TestEmptyDirOverTmp(t *testing.T) {
	needCluster(t)
	for _, p := range []string{agents[cpuNode].opts.Dir, agents[cpuNode].opts.Binary} {
		if !strings.HasPrefix(p, "/tmp/") {
			t.Fatalf("%s is not under /tmp: the test proves nothing", p)
		}
	}
	ns := namespace(t)
	ctx := context.Background()
	if _, err := k8s.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "conf"}, Data: map[string]string{"model": "ouro-tiny"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	onHost, err := os.CreateTemp("/tmp", "host-only-")
	if err != nil {
		t.Fatal(err)
	}
	onHost.Close()
	t.Cleanup(func() { os.Remove(onHost.Name()) })
	// The default termination-message path: made in the container's overlay of /dev, so it
	// must not appear on the host (unless an older agent left it there).
	_, termLogErr := os.Lstat(DefaultTerminationMessagePath)
	mounts := []corev1.VolumeMount{{Name: "tmp", MountPath: "/tmp"}, {Name: "conf", MountPath: "/etc/ls-tmp-test"}}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tmp", Namespace: ns},
		Spec: corev1.PodSpec{
			NodeSelector:  map[string]string{corev1.LabelHostname: cpuNode},
			RestartPolicy: corev1.RestartPolicyNever,
			InitContainers: []corev1.Container{{
				Name: "init", Image: "loopserve:ignored", Command: []string{"loopserve"}, Args: helperArgs("exit", "0", "init done"),
				VolumeMounts: mounts,
			}},
			Containers: []corev1.Container{{
				Name: "main", Image: "loopserve:ignored", Command: []string{"loopserve"}, Args: helperArgs("serve", ":8080"),
				VolumeMounts:   mounts,
				ReadinessProbe: httpProbe("/healthz", 8080),
			}},
			Volumes: []corev1.Volume{
				{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				{Name: "conf", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
					LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}}}},
			},
		},
	}
	if _, err := k8s.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	removeMountPoints(t, ns, "/etc/ls-tmp-test")
	var p *corev1.Pod
	await(t, "the pod Ready", func(ctx context.Context) (bool, error) {
		p, err = getPod(ctx, ns, "tmp")
		if err != nil {
			return false, err
		}
		return podReady(p), nil
	})
	if st := p.Status.InitContainerStatuses; len(st) != 1 || st[0].State.Terminated == nil || st[0].State.Terminated.Message != "init done" {
		t.Errorf("init container status %+v, want terminated with the message %q", st, "init done")
	}
	base := "http://" + p.Status.PodIP + ":8080"
	if got, err := get(ctx, base+"/read?path="+url.QueryEscape("/etc/ls-tmp-test/model")); err != nil || got != "ouro-tiny" {
		t.Errorf("the configMap's file reads %q, %v; want %q", got, err, "ouro-tiny")
	}
	// a name no host has yet: the host's /tmp must not hold it afterwards
	name := "ls-scratch-" + string(p.UID)
	if _, err := os.Lstat(filepath.Join("/tmp", name)); err == nil {
		t.Fatalf("the host's /tmp already holds %s", name)
	}
	if _, err := get(ctx, base+"/write?path="+url.QueryEscape("/tmp/"+name)); err != nil {
		t.Fatal(err)
	}
	if got, err := get(ctx, base+"/read?path="+url.QueryEscape(onHost.Name())); err == nil {
		t.Errorf("the host's %s is visible in the pod's /tmp (read %q)", onHost.Name(), got)
	}
	scratch := filepath.Join(agents[cpuNode].opts.Dir, "pods", fmt.Sprintf("%s_%s_%s", ns, p.Name, p.UID), "volumes", "tmp", name)
	if b, err := os.ReadFile(scratch); err != nil || string(b) != "written" {
		t.Errorf("the pod's /tmp/%s in its emptyDir %s: %q, %v; want %q", name, scratch, b, err, "written")
	}
	if _, err := os.Lstat(filepath.Join("/tmp", name)); err == nil {
		t.Errorf("the pod's /tmp/%s was written on the host's /tmp", name)
	}
	if _, err := os.Lstat("/etc/ls-tmp-test"); err == nil {
		t.Errorf("the mount point /etc/ls-tmp-test was made on the host, not in the container's overlay of /etc")
	}
	if _, err := os.Lstat(DefaultTerminationMessagePath); err == nil && termLogErr != nil {
		t.Errorf("the mount point %s was made on the host", DefaultTerminationMessagePath)
	}
}
