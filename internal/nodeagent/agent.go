// Package nodeagent is a node agent for one-machine test clusters: it registers a Node with the
// API server and runs every pod bound to it as local processes, as a kubelet would run
// containers. It is built on virtual-kubelet's node package (NodeController for the Node, its
// status and lease heartbeats; PodController for the pods bound to it), with a provider that
// starts processes instead of containers.
//
// Images are ignored: every container runs on the host's filesystem. A container whose command
// is empty runs Options.Binary with its args; a command whose first word is "loopserve" (or a
// path ending in /loopserve) runs Options.Binary with the rest; any other command runs as given.
//
// Each pod gets a network namespace with its own address from a podnet.Network (host-network
// pods share the host's). Each container runs in its own mount namespace inside it:
//
//	ip netns exec <pod> unshare --mount --propagation private -- /bin/sh -c <script>
//
// where the script bind-mounts the pod's volumes (host folders under Options.Dir) and the
// container's termination-message file onto the paths the pod spec names, then changes to the
// working directory and execs the program, so the program's process is the one the agent
// started (signals and exit status are its own). The mounts are private to that process and its
// children. Every source is first bound into a private tmpfs (a "stage" folder of the
// container's) and mounted from there, and Options.Binary is opened before any mount and run
// as /proc/self/fd/3 (the program inherits that descriptor), so a volume mounted over a folder
// that holds Options.Dir or the binary (an emptyDir at /tmp) hides neither. A mount point
// missing on the host (/dev/termination-log, /var/run/secrets/kubernetes.io/serviceaccount,
// /etc/<app>) is made in an overlay of its nearest existing folder (/dev, /run, /etc) whose
// upper layer is in the stage, the folder's own submounts (/dev/pts) put back on top, so
// nothing is created on the host; only mount points directly under / (/data) are made there,
// empty, and left in place. This was chosen over a re-executed helper binary because it needs
// nothing in the programs that import this package, and over chroot or overlay roots because
// the programs run from the host's filesystem anyway.
//
// Volumes: emptyDir, configMap, secret (a file per key, items and modes honoured), downwardAPI,
// hostPath, persistentVolumeClaim (a folder per claim under Options.Dir, kept across pods), and
// projected volumes of those plus serviceAccountToken (a TokenRequest bound to the pod), so the
// kube-api-access volume gives in-cluster clients a token, ca.crt and namespace at
// /var/run/secrets/kubernetes.io/serviceaccount. Every container gets KUBERNETES_SERVICE_HOST
// and KUBERNETES_SERVICE_PORT from Options.APIServer. Contents are written once, when the pod
// starts; tokens are not refreshed.
//
// Probes (httpGet and tcpSocket at the pod IP from the host; exec, and the kubelet API's exec,
// through nsenter into the container's mount and network namespaces) and the kubelet API that
// kubectl reaches through the API server (logs, exec without a TTY, port-forward) are served as
// a kubelet serves them; the API listens on the node's InternalIP with a self-signed
// certificate and checks no credentials (a test machine's).
//
// Not modelled: resource limits, security contexts (everything runs as the agent's user),
// lifecycle hooks, restartable init (sidecar) containers, gRPC probes, attach and TTYs, service
// environment variables and Service IPs (no proxy), DNS (the host's resolv.conf is used),
// image pulls.
//
// Ownership: Start owns the Node object, its Lease, the controllers' goroutines and every
// process and sandbox it creates for pods; Stop ends the pods (SIGTERM to each process group,
// SIGKILL after the grace period), removes their sandboxes, deletes the Node and its Lease and
// waits for every goroutine. The podnet.Network stays the caller's. Logs stay under Dir.
package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	vklog "github.com/virtual-kubelet/virtual-kubelet/log"
	vkslog "github.com/virtual-kubelet/virtual-kubelet/log/slog"
	"github.com/virtual-kubelet/virtual-kubelet/node"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"

	"github.com/loopserve/loopserve/internal/podnet"
)

// KubeletVersion is what the Node reports as its kubelet version.
const KubeletVersion = "v1.37.2-loopserve-nodeagent"

// Options configure Start.
type Options struct {
	// Config holds credentials to the API server (an administrator's are fine).
	Config *rest.Config
	// NodeName names the Node (a DNS subdomain).
	NodeName string
	// Binary is the locally built loopserve binary. Images are ignored: a container whose
	// command is empty runs Binary with its args; command[0] "loopserve" (or a path ending in
	// /loopserve) is replaced by Binary; any other command runs as given.
	Binary string
	// Dir holds per-pod folders (volumes, termination messages), claim folders, the logs of
	// every container (see LogPath) and the agent's own log (agent.log).
	Dir string
	// Network gives each pod a sandbox with its own address. Required unless every pod uses
	// the host network.
	Network *podnet.Network
	// Capacity is the Node's capacity and allocatable: cpu, memory, pods, and nvidia.com/gpu
	// where GPU pods should schedule (such a node runs the CPU engine: it has no GPU).
	// Missing cpu, memory and pods default to 8, 16Gi and 110.
	Capacity corev1.ResourceList
	// APIServer is what pods get as KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT: an
	// address they reach from their network namespace.
	APIServer netip.AddrPort
}

// Agent is a running node agent.
type Agent struct {
	opts   Options
	client kubernetes.Interface
	prov   *provider
	log    *slog.Logger
	logf   *os.File

	cancel context.CancelFunc
	wg     sync.WaitGroup
	events record.EventBroadcaster
	nc     *node.NodeController
	pc     *node.PodController

	kubeletPort int32  // of the kubelet API (logs, exec, port-forward); 0 when not served
	stopKubelet func() // stops the kubelet API

	stopOnce sync.Once
	stopErr  error
}

// Start registers the Node and starts serving the pods bound to it; it returns once the Node is
// Ready and schedulable (the node lifecycle controller has lifted its not-ready taint). ctx
// bounds that wait; the Agent runs until Stop. On error it undoes what it did.
func Start(ctx context.Context, o Options) (*Agent, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", o.Dir, err)
	}
	logf, err := os.OpenFile(filepath.Join(o.Dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening the agent log: %w", err)
	}
	logger := slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", o.NodeName)
	client, err := kubernetes.NewForConfig(o.Config)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("creating a client: %w", err), logf.Close())
	}
	runCtx, cancel := context.WithCancel(vklog.WithLogger(context.Background(), vkslog.FromSlog(logger)))
	a := &Agent{opts: o, client: client, log: logger, logf: logf, cancel: cancel}
	a.prov = newProvider(o, client, logger)
	if err := a.start(ctx, runCtx); err != nil {
		return nil, errors.Join(fmt.Errorf("starting node %s: %w", o.NodeName, err), a.Stop())
	}
	return a, nil
}

func (o *Options) validate() error {
	switch {
	case o.Config == nil:
		return errors.New("nodeagent: Options.Config is required")
	case o.NodeName == "":
		return errors.New("nodeagent: Options.NodeName is required")
	case o.Dir == "":
		return errors.New("nodeagent: Options.Dir is required")
	case o.Binary == "":
		return errors.New("nodeagent: Options.Binary is required")
	case !o.APIServer.IsValid():
		return errors.New("nodeagent: Options.APIServer is required")
	}
	if !filepath.IsAbs(o.Dir) {
		abs, err := filepath.Abs(o.Dir)
		if err != nil {
			return fmt.Errorf("nodeagent: Options.Dir %q: %w", o.Dir, err)
		}
		o.Dir = abs
	}
	return nil
}

func (a *Agent) start(ctx, runCtx context.Context) error {
	o := a.opts
	port, stop, err := a.startKubeletAPI()
	if err != nil {
		return err
	}
	a.kubeletPort, a.stopKubelet = port, stop
	a.events = record.NewBroadcaster(record.WithContext(runCtx))
	a.events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.client.CoreV1().Events("")})
	recorder := a.events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "nodeagent", Host: o.NodeName})

	nc, err := node.NewNodeController(node.NaiveNodeProvider{}, a.nodeObject(), a.client.CoreV1().Nodes(),
		node.WithNodeEnableLeaseV1(a.client.CoordinationV1().Leases(corev1.NamespaceNodeLease), node.DefaultLeaseDuration),
		node.WithNodeStatusUpdateErrorHandler(a.recreateNode),
	)
	if err != nil {
		return fmt.Errorf("creating the node controller: %w", err)
	}
	a.nc = nc

	podInformers := informers.NewSharedInformerFactoryWithOptions(a.client, time.Minute,
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", o.NodeName).String()
		}))
	others := informers.NewSharedInformerFactory(a.client, time.Minute)
	pc, err := node.NewPodController(node.PodControllerConfig{
		PodClient:         a.client.CoreV1(),
		PodInformer:       podInformers.Core().V1().Pods(),
		EventRecorder:     recorder,
		Provider:          a.prov,
		ConfigMapInformer: others.Core().V1().ConfigMaps(),
		SecretInformer:    others.Core().V1().Secrets(),
		ServiceInformer:   others.Core().V1().Services(),
		// The provider resolves the environment itself, once the pod's IP is known, and sets
		// KUBERNETES_SERVICE_* to an address pods reach.
		SkipDownwardAPIResolution: true,
	})
	if err != nil {
		return fmt.Errorf("creating the pod controller: %w", err)
	}
	a.pc = pc

	a.wg.Go(func() {
		if err := nc.Run(runCtx); err != nil && runCtx.Err() == nil {
			a.log.Error("node controller exited", "err", err)
		}
	})
	select {
	case <-nc.Ready():
	case <-nc.Done():
		return fmt.Errorf("registering the node: %w", nc.Err())
	case <-ctx.Done():
		return fmt.Errorf("registering the node: %w", ctx.Err())
	}
	podInformers.Start(runCtx.Done())
	others.Start(runCtx.Done())
	a.wg.Go(func() {
		<-runCtx.Done()
		podInformers.Shutdown()
		others.Shutdown()
	})
	a.wg.Go(func() {
		if err := pc.Run(runCtx, 4); err != nil && runCtx.Err() == nil {
			a.log.Error("pod controller exited", "err", err)
		}
	})
	select {
	case <-pc.Ready():
	case <-pc.Done():
		return fmt.Errorf("starting the pod controller: %w", pc.Err())
	case <-ctx.Done():
		return fmt.Errorf("starting the pod controller: %w", ctx.Err())
	}
	return a.awaitSchedulable(ctx)
}

// awaitSchedulable waits until the Node is Ready and carries no not-ready or unreachable taint
// (the API server adds one at registration; the node lifecycle controller lifts it).
func (a *Agent) awaitSchedulable(ctx context.Context) error {
	err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		n, err := a.client.CoreV1().Nodes().Get(ctx, a.opts.NodeName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		for _, t := range n.Spec.Taints {
			if t.Key == corev1.TaintNodeNotReady || t.Key == corev1.TaintNodeUnreachable {
				return false, nil
			}
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("awaiting the node's Ready condition without a not-ready taint: %w", err)
	}
	return nil
}

// recreateNode registers the Node again when a status update finds it deleted.
func (a *Agent) recreateNode(ctx context.Context, err error) error {
	if !apierrors.IsNotFound(err) {
		return err
	}
	_, cerr := a.client.CoreV1().Nodes().Create(ctx, a.nodeObject(), metav1.CreateOptions{})
	return cerr
}

// nodeObject is the Node as registered: capacity, Ready, addresses.
func (a *Agent) nodeObject() *corev1.Node {
	o := a.opts
	capacity := o.Capacity.DeepCopy()
	if capacity == nil {
		capacity = corev1.ResourceList{}
	}
	for name, def := range defaultCapacity {
		if _, ok := capacity[name]; !ok {
			capacity[name] = def.DeepCopy()
		}
	}
	now := metav1.Now()
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	addrs := []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: o.NodeName}}
	if ip := a.hostIP(); ip != "" {
		addrs = append([]corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}, addrs...)
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: o.NodeName,
			Labels: map[string]string{
				corev1.LabelHostname:      o.NodeName,
				corev1.LabelOSStable:      "linux",
				corev1.LabelArchStable:    goarch(),
				"loopserve.io/node-agent": "true",
			},
		},
		Status: corev1.NodeStatus{
			Capacity:    capacity,
			Allocatable: capacity.DeepCopy(),
			Phase:       corev1.NodeRunning,
			Conditions: []corev1.NodeCondition{
				cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "node agent is ready"),
				cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", ""),
				cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", ""),
				cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", ""),
				cond(corev1.NodeNetworkUnavailable, corev1.ConditionFalse, "RouteCreated", ""),
			},
			Addresses: addrs,
			DaemonEndpoints: corev1.NodeDaemonEndpoints{
				KubeletEndpoint: corev1.DaemonEndpoint{Port: a.kubeletPort},
			},
			NodeInfo: corev1.NodeSystemInfo{
				KubeletVersion:          KubeletVersion,
				OperatingSystem:         "linux",
				Architecture:            goarch(),
				ContainerRuntimeVersion: "process://" + KubeletVersion,
			},
		},
	}
}

// hostIP is the node's address as pods see it: the bridge's.
func (a *Agent) hostIP() string { return a.prov.hostIP() }

// LogPath is the file holding the output (stdout and stderr) of a pod's container, across its
// restarts; it outlives the pod.
func (a *Agent) LogPath(namespace, pod, container string) string {
	return logPath(a.opts.Dir, namespace, pod, container)
}

func logPath(dir, namespace, pod, container string) string {
	return filepath.Join(dir, "logs", namespace, pod, container+".log")
}

// Stop ends every pod (SIGTERM to each container's process group, SIGKILL after its grace
// period), removes their sandboxes, stops the controllers, deletes the Node and its Lease and
// waits for all of it. It is safe to call more than once.
func (a *Agent) Stop() error {
	a.stopOnce.Do(func() {
		var errs []error
		errs = append(errs, a.prov.stopAll())
		a.cancel()
		a.wg.Wait()
		if a.stopKubelet != nil {
			a.stopKubelet()
		}
		if a.events != nil {
			a.events.Shutdown()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.client.CoreV1().Nodes().Delete(ctx, a.opts.NodeName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting node %s: %w", a.opts.NodeName, err))
		}
		if err := a.client.CoordinationV1().Leases(corev1.NamespaceNodeLease).Delete(ctx, a.opts.NodeName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting lease %s: %w", a.opts.NodeName, err))
		}
		errs = append(errs, a.logf.Close())
		a.stopErr = errors.Join(errs...)
	})
	return a.stopErr
}
