package nodeagent

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"sync"

	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
)

var defaultCapacity = corev1.ResourceList{
	corev1.ResourceCPU:    resource.MustParse("8"),
	corev1.ResourceMemory: resource.MustParse("16Gi"),
	corev1.ResourcePods:   resource.MustParse("110"),
}

func goarch() string { return runtime.GOARCH }

// provider is the PodController's view of the agent: it keeps one podRun per pod bound to the
// node and reports their statuses through the callback NotifyPods registers.
//
// Ownership: the provider owns every podRun; a podRun is removed once its processes have ended
// after a deletion. stopAll ends them all and waits.
type provider struct {
	opts   Options
	client kubernetes.Interface
	log    *slog.Logger

	mu      sync.Mutex
	pods    map[string]*podRun // by namespace/name
	notify  func(*corev1.Pod)
	stopped bool
	wg      sync.WaitGroup
}

func newProvider(o Options, client kubernetes.Interface, log *slog.Logger) *provider {
	return &provider{opts: o, client: client, log: log, pods: map[string]*podRun{}, notify: func(*corev1.Pod) {}}
}

// hostIP is the node's address as pods see it: the bridge's.
func (p *provider) hostIP() string {
	if p.opts.Network == nil {
		return ""
	}
	return p.opts.Network.Gateway().String()
}

func key(namespace, name string) string { return namespace + "/" + name }

// NotifyPods registers the callback that receives every status change.
func (p *provider) NotifyPods(_ context.Context, cb func(*corev1.Pod)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.notify = cb
}

func (p *provider) notifier() func(*corev1.Pod) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.notify
}

// CreatePod starts running pod; it returns at once, the pod's progress shows in its status.
func (p *provider) CreatePod(_ context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("node agent is stopping")
	}
	k := key(pod.Namespace, pod.Name)
	if r, ok := p.pods[k]; ok && r.uid() == pod.UID {
		return nil
	}
	r := newPodRun(p, pod.DeepCopy())
	p.pods[k] = r
	p.wg.Go(func() {
		r.run()
		p.forget(k, r)
	})
	return nil
}

// forget drops r once it has ended, unless a newer pod of the same name replaced it.
func (p *provider) forget(k string, r *podRun) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pods[k] == r {
		delete(p.pods, k)
	}
}

// UpdatePod takes the pod's new metadata (labels, annotations); images and the rest are ignored.
func (p *provider) UpdatePod(_ context.Context, pod *corev1.Pod) error {
	r := p.get(pod.Namespace, pod.Name)
	if r == nil || r.uid() != pod.UID {
		return errdefs.NotFoundf("pod %s/%s is not running here", pod.Namespace, pod.Name)
	}
	r.update(pod)
	return nil
}

// DeletePod starts ending the pod's containers with its grace period and returns; once they
// have ended the agent removes the pod from the API server.
func (p *provider) DeletePod(_ context.Context, pod *corev1.Pod) error {
	r := p.get(pod.Namespace, pod.Name)
	if r == nil || (pod.UID != "" && r.uid() != pod.UID) {
		return errdefs.NotFoundf("pod %s/%s is not running here", pod.Namespace, pod.Name)
	}
	r.terminate(gracePeriod(pod), true)
	return nil
}

func (p *provider) get(namespace, name string) *podRun {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pods[key(namespace, name)]
}

// GetPod returns the pod with the status the agent reports.
func (p *provider) GetPod(_ context.Context, namespace, name string) (*corev1.Pod, error) {
	r := p.get(namespace, name)
	if r == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not running here", namespace, name)
	}
	return r.snapshot(), nil
}

// GetPodStatus returns the status the agent reports for the pod.
func (p *provider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

// GetPods returns every pod the agent runs.
func (p *provider) GetPods(context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	runs := make([]*podRun, 0, len(p.pods))
	for _, r := range p.pods {
		runs = append(runs, r)
	}
	p.mu.Unlock()
	pods := make([]*corev1.Pod, 0, len(runs))
	for _, r := range runs {
		pods = append(pods, r.snapshot())
	}
	return pods, nil
}

// stopAll ends every pod with its grace period, without removing them from the API server, and
// waits for all of them.
func (p *provider) stopAll() error {
	p.mu.Lock()
	p.stopped = true
	runs := make([]*podRun, 0, len(p.pods))
	for _, r := range p.pods {
		runs = append(runs, r)
	}
	p.mu.Unlock()
	for _, r := range runs {
		r.terminate(gracePeriod(r.specPod()), false)
	}
	p.wg.Wait()
	return nil
}
