package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/loopserve/loopserve/internal/podnet"
)

// Restart back-off: a container that exits and is to be restarted waits backoffBase, then
// twice as long after each further exit, up to backoffCap; a run longer than backoffReset
// starts the sequence again. (A kubelet uses 10 s and 5 min; shorter here, for tests.)
const (
	backoffBase  = time.Second
	backoffCap   = 30 * time.Second
	backoffReset = time.Minute
)

// defaultGrace is the termination grace period of a pod that names none.
const defaultGrace = 30 * time.Second

// gracePeriod is how long pod's processes get between SIGTERM and SIGKILL.
func gracePeriod(pod *corev1.Pod) time.Duration {
	switch {
	case pod.DeletionGracePeriodSeconds != nil:
		return time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	case pod.Spec.TerminationGracePeriodSeconds != nil:
		return time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	return defaultGrace
}

// podRun runs one pod: its sandbox, volumes, init containers in order, then its containers,
// each supervised (restarts, probes) until the pod ends or is deleted.
//
// Ownership: run owns the sandbox, the pod's folder and every process; it returns once they
// are gone (after terminate, or once the pod has ended and then been deleted or the agent
// stops). mu guards every field below it and the containers' state.
type podRun struct {
	prov *provider
	dir  string // the pod's folder

	stop     chan struct{} // closed by terminate
	stopOnce sync.Once
	changed  chan struct{} // a status change to report (capacity 1)

	mu         sync.Mutex
	pod        *corev1.Pod // metadata and spec, from the API server
	grace      time.Duration
	fromAPI    bool // terminate asked to remove the pod from the API server once ended
	sandbox    *podnet.Sandbox
	podIP      string
	startTime  metav1.Time
	volumes    map[string]volume
	initDone   bool
	sandboxed  bool   // the sandbox exists (PodReadyToStartContainers)
	failReason string // the pod failed before its containers could run
	failMsg    string
	inits      []*container
	mains      []*container
	conds      map[corev1.PodConditionType]corev1.PodCondition
}

func newPodRun(p *provider, pod *corev1.Pod) *podRun {
	r := &podRun{
		prov:    p,
		dir:     filepath.Join(p.opts.Dir, "pods", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
		stop:    make(chan struct{}),
		changed: make(chan struct{}, 1),
		pod:     pod,
		conds:   map[corev1.PodConditionType]corev1.PodCondition{},
	}
	for _, c := range pod.Spec.InitContainers {
		r.inits = append(r.inits, newContainer(r, c, true))
	}
	for _, c := range pod.Spec.Containers {
		r.mains = append(r.mains, newContainer(r, c, false))
	}
	return r
}

func (r *podRun) uid() types.UID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pod.UID
}

func (r *podRun) specPod() *corev1.Pod {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pod.DeepCopy()
}

// update takes new metadata from the API server's pod.
func (r *podRun) update(pod *corev1.Pod) {
	r.mu.Lock()
	r.pod.Labels, r.pod.Annotations = pod.Labels, pod.Annotations
	r.pod.DeletionTimestamp, r.pod.DeletionGracePeriodSeconds = pod.DeletionTimestamp, pod.DeletionGracePeriodSeconds
	r.mu.Unlock()
	r.markChanged()
}

// terminate ends the pod: SIGTERM to every running container, SIGKILL after grace. With
// fromAPI the pod is removed from the API server once its processes have ended.
func (r *podRun) terminate(grace time.Duration, fromAPI bool) {
	r.mu.Lock()
	if fromAPI {
		r.fromAPI = true
	}
	r.mu.Unlock()
	r.stopOnce.Do(func() {
		r.mu.Lock()
		r.grace = grace
		r.mu.Unlock()
		close(r.stop)
	})
}

func (r *podRun) stopping() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// sleep waits d; false when the pod is being terminated.
func (r *podRun) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.stop:
		return false
	}
}

func (r *podRun) markChanged() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *podRun) logf(msg string, args ...any) {
	r.prov.log.Info(msg, append([]any{"pod", key(r.pod.Namespace, r.pod.Name)}, args...)...)
}

// run runs the pod to its end and reports every change on the way.
func (r *podRun) run() {
	notified := make(chan struct{})
	quit := make(chan struct{})
	go func() {
		defer close(notified)
		for {
			select {
			case <-r.changed:
				r.prov.notifier()(r.snapshot())
			case <-quit:
				select {
				case <-r.changed:
					r.prov.notifier()(r.snapshot())
				default:
				}
				return
			}
		}
	}()

	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-r.stop:
		case <-ctx.Done():
		}
		cancel()
	}()
	r.execute(ctx)
	r.release()
	r.markChanged()
	<-r.stop // an ended pod is kept until it is deleted or the agent stops
	cancel()
	close(quit)
	<-notified

	if err := os.RemoveAll(r.dir); err != nil {
		r.logf("removing the pod folder", "err", err)
	}
	r.mu.Lock()
	fromAPI, pod := r.fromAPI, r.pod
	r.mu.Unlock()
	if fromAPI {
		r.removeFromAPI(pod)
	}
}

// removeFromAPI confirms the deletion as a kubelet does: grace 0, for this pod's UID only.
func (r *podRun) removeFromAPI(pod *corev1.Pod) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts := *metav1.NewDeleteOptions(0)
	opts.Preconditions = metav1.NewUIDPreconditions(string(pod.UID))
	err := r.prov.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, opts)
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		r.logf("removing the pod from the API server", "err", err)
	}
}

// execute makes the sandbox and the volumes, runs the init containers, then the containers
// until they have all ended (for good, or because the pod is being terminated).
func (r *podRun) execute(ctx context.Context) {
	r.mu.Lock()
	r.startTime = metav1.Now()
	r.mu.Unlock()
	r.markChanged()

	if err := r.makeSandbox(); err != nil {
		r.fail("SandboxFailed", err.Error())
		return
	}
	for backoff := backoffBase; ; backoff = min(2*backoff, backoffCap) {
		err := r.makeVolumes(ctx)
		if err == nil {
			break
		}
		r.logf("preparing volumes", "err", err)
		r.setWaiting("ContainerCreating", fmt.Sprintf("preparing volumes: %v", err))
		if !r.sleep(backoff) {
			return
		}
	}
	for _, c := range r.inits {
		if !c.supervise(ctx) {
			return // terminated, or failed for good (the phase says Failed)
		}
	}
	r.mu.Lock()
	r.initDone = true
	r.mu.Unlock()
	r.markChanged()
	var wg sync.WaitGroup
	for _, c := range r.mains {
		wg.Go(func() { c.supervise(ctx) })
	}
	wg.Wait()
}

func (r *podRun) makeSandbox() error {
	pod := r.specPod()
	if pod.Spec.HostNetwork {
		r.mu.Lock()
		r.podIP, r.sandboxed = r.prov.hostIP(), true
		r.mu.Unlock()
		r.markChanged()
		return nil
	}
	n := r.prov.opts.Network
	if n == nil {
		return errors.New("the node agent has no pod network (Options.Network) and the pod does not use the host network")
	}
	sb, err := n.Add("lsp-" + string(pod.UID))
	if err != nil {
		return fmt.Errorf("creating the pod's network namespace: %w", err)
	}
	r.mu.Lock()
	r.sandbox, r.podIP, r.sandboxed = sb, sb.Addr().String(), true
	r.mu.Unlock()
	r.markChanged()
	return nil
}

// release removes the sandbox once no process of the pod runs.
func (r *podRun) release() {
	r.mu.Lock()
	sb := r.sandbox
	r.sandbox, r.sandboxed = nil, false
	r.mu.Unlock()
	if sb != nil {
		if err := sb.Remove(); err != nil {
			r.logf("removing the sandbox", "err", err)
		}
	}
}

// fail marks the pod Failed before its containers could run.
func (r *podRun) fail(reason, msg string) {
	r.logf("pod failed", "reason", reason, "message", msg)
	r.mu.Lock()
	r.failReason, r.failMsg = reason, msg
	r.mu.Unlock()
	r.markChanged()
}

// setWaiting sets every container that has not run yet waiting with reason.
func (r *podRun) setWaiting(reason, msg string) {
	r.mu.Lock()
	for _, c := range append(append([]*container{}, r.inits...), r.mains...) {
		if c.state.Running == nil && c.state.Terminated == nil {
			c.state.Waiting = &corev1.ContainerStateWaiting{Reason: reason, Message: msg}
		}
	}
	r.mu.Unlock()
	r.markChanged()
}

func (r *podRun) hostIP() string { return r.prov.hostIP() }

// snapshot is the pod with the status the agent reports now.
func (r *podRun) snapshot() *corev1.Pod {
	r.mu.Lock()
	defer r.mu.Unlock()
	pod := r.pod.DeepCopy()
	st := &pod.Status
	if host := r.hostIP(); host != "" {
		st.HostIP, st.HostIPs = host, []corev1.HostIP{{IP: host}}
	}
	if r.podIP != "" {
		st.PodIP, st.PodIPs = r.podIP, []corev1.PodIP{{IP: r.podIP}}
	}
	if !r.startTime.IsZero() {
		st.StartTime = r.startTime.DeepCopy()
	}
	st.InitContainerStatuses = nil
	for _, c := range r.inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.status())
	}
	st.ContainerStatuses = nil
	for _, c := range r.mains {
		st.ContainerStatuses = append(st.ContainerStatuses, c.status())
	}
	st.Phase = r.phase()
	st.Reason, st.Message = r.failReason, r.failMsg

	allReady := len(r.mains) > 0
	for _, c := range r.mains {
		allReady = allReady && c.ready
	}
	ready := allReady && st.Phase == corev1.PodRunning
	r.setCondition(corev1.PodReadyToStartContainers, r.sandboxed || st.Phase == corev1.PodSucceeded || st.Phase == corev1.PodFailed && r.failReason == "", "")
	r.setCondition(corev1.PodInitialized, r.initDone, reasonIf(!r.initDone, "ContainersNotInitialized"))
	r.setCondition(corev1.ContainersReady, ready, reasonIf(!ready, "ContainersNotReady"))
	r.setCondition(corev1.PodReady, ready, reasonIf(!ready, "ContainersNotReady"))
	var conds []corev1.PodCondition
	for _, c := range st.Conditions {
		if _, ours := r.conds[c.Type]; !ours {
			conds = append(conds, c) // PodScheduled and others' conditions stay as they are
		}
	}
	for _, t := range []corev1.PodConditionType{corev1.PodReadyToStartContainers, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		conds = append(conds, r.conds[t])
	}
	st.Conditions = conds
	return pod
}

func reasonIf(cond bool, reason string) string {
	if cond {
		return reason
	}
	return ""
}

// setCondition records a condition, keeping its transition time while its status holds.
func (r *podRun) setCondition(t corev1.PodConditionType, ok bool, reason string) {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
	}
	if c, found := r.conds[t]; found && c.Status == s && c.Reason == reason {
		return
	}
	r.conds[t] = corev1.PodCondition{Type: t, Status: s, Reason: reason, LastTransitionTime: metav1.Now()}
}

// phase follows a kubelet's rules: Pending until every container has started once, then
// Running while any runs or will be restarted, Succeeded or Failed once all have ended for good.
func (r *podRun) phase() corev1.PodPhase {
	if r.failReason != "" {
		return corev1.PodFailed
	}
	for _, c := range r.inits {
		if t := c.state.Terminated; t != nil && t.ExitCode != 0 && !c.willRestart(t.ExitCode) && !r.initDone {
			return corev1.PodFailed
		}
	}
	if !r.initDone {
		return corev1.PodPending
	}
	var pending, running, stopped, succeeded int
	for _, c := range r.mains {
		switch {
		case c.state.Running != nil:
			running++
		case c.state.Terminated != nil:
			stopped++
			if c.state.Terminated.ExitCode == 0 {
				succeeded++
			}
		case c.last.Terminated != nil:
			stopped++ // waiting to restart
		default:
			pending++
		}
	}
	switch {
	case pending > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case stopped == 0:
		return corev1.PodPending
	}
	switch r.pod.Spec.RestartPolicy {
	case corev1.RestartPolicyNever:
		if stopped == succeeded {
			return corev1.PodSucceeded
		}
		return corev1.PodFailed
	case corev1.RestartPolicyOnFailure:
		if stopped == succeeded {
			return corev1.PodSucceeded
		}
		return corev1.PodRunning
	}
	return corev1.PodRunning
}
