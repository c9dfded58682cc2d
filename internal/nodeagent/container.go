package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Limits of a termination message, as a kubelet's.
const (
	maxMessageBytes = 4096
	maxLogTailBytes = 2048
	maxLogTailLines = 80
)

// container is one container of a pod and the state the agent reports for it. Its state
// fields are guarded by the pod's mu.
type container struct {
	pod  *podRun
	spec corev1.Container
	init bool
	dir  string // its folder: the termination-message file

	state    corev1.ContainerState
	last     corev1.ContainerState
	restarts int32
	ready    bool
	started  bool
	id       string // containerID of the current or last process

	pid int      // of the running process, 0 when none
	env []string // of the running process

	logStart int64 // where the current run's output starts in the log (the supervisor's own)
}

func newContainer(r *podRun, spec corev1.Container, init bool) *container {
	return &container{
		pod:   r,
		spec:  spec,
		init:  init,
		dir:   filepath.Join(r.dir, "containers", spec.Name),
		state: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: waitingReason(init)}},
	}
}

func waitingReason(init bool) string {
	if init {
		return "PodInitializing"
	}
	return "ContainerCreating"
}

// status is the container's status; the caller holds the pod's mu.
func (c *container) status() corev1.ContainerStatus {
	started := c.started
	return corev1.ContainerStatus{
		Name:                 c.spec.Name,
		State:                *c.state.DeepCopy(),
		LastTerminationState: *c.last.DeepCopy(),
		Ready:                c.ready,
		RestartCount:         c.restarts,
		Image:                c.spec.Image,
		ImageID:              "",
		ContainerID:          c.id,
		Started:              &started,
	}
}

// willRestart says whether an exit with code is followed by a restart, per the pod's
// restartPolicy (an init container that succeeded is done).
func (c *container) willRestart(code int32) bool {
	policy := c.pod.pod.Spec.RestartPolicy
	if c.init {
		return code != 0 && policy != corev1.RestartPolicyNever
	}
	switch policy {
	case corev1.RestartPolicyNever:
		return false
	case corev1.RestartPolicyOnFailure:
		return code != 0
	}
	return true
}

// supervise runs the container, restarting it per the restart policy with back-off, until it
// has ended for good or the pod is terminated. It reports whether the last run succeeded.
func (c *container) supervise(ctx context.Context) bool {
	backoff := backoffBase
	for {
		if c.pod.stopping() {
			return false
		}
		env, err := c.pod.containerEnv(ctx, &c.spec)
		if err != nil {
			c.pod.logf("resolving the environment", "container", c.spec.Name, "err", err)
			c.setWaiting("CreateContainerConfigError", err.Error())
			if !c.pod.sleep(backoff) {
				return false
			}
			backoff = min(2*backoff, backoffCap)
			continue
		}
		began := time.Now()
		code := c.runOnce(env)
		if c.pod.stopping() {
			return code == 0
		}
		if !c.willRestart(code) {
			return code == 0
		}
		if time.Since(began) > backoffReset {
			backoff = backoffBase
		}
		c.setWaiting("CrashLoopBackOff", fmt.Sprintf("back-off %s restarting container %s", backoff, c.spec.Name))
		if !c.pod.sleep(backoff) {
			return false
		}
		backoff = min(2*backoff, backoffCap)
		c.pod.mu.Lock()
		c.restarts++
		c.pod.mu.Unlock()
	}
}

// setWaiting moves the container to waiting, keeping its last termination.
func (c *container) setWaiting(reason, msg string) {
	c.pod.mu.Lock()
	if c.state.Terminated != nil {
		c.last = corev1.ContainerState{Terminated: c.state.Terminated}
	}
	c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: msg}}
	c.ready = false
	c.pod.mu.Unlock()
	c.pod.markChanged()
}

// runOnce starts the process, probes it, ends it when the pod is terminated or its liveness
// probe fails, and records its termination; it returns the exit code.
func (c *container) runOnce(env []string) int32 {
	started := metav1.Now()
	cmd, logf, err := c.command(env)
	if err == nil {
		err = cmd.Start()
		if err != nil {
			err = fmt.Errorf("starting %s: %w", cmd.Path, err)
		}
	}
	if err != nil {
		if logf != nil {
			fmt.Fprintf(logf, "nodeagent: %v\n", err)
			logf.Close()
		}
		c.terminated(corev1.ContainerStateTerminated{ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: started, FinishedAt: metav1.Now()})
		return 128
	}
	defer logf.Close()
	pid := cmd.Process.Pid
	c.pod.mu.Lock()
	if c.state.Terminated != nil {
		c.last = corev1.ContainerState{Terminated: c.state.Terminated}
	}
	c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}}
	c.id = "process://" + strconv.Itoa(pid)
	c.pid, c.env = pid, env
	c.started = c.spec.StartupProbe == nil
	c.ready = c.spec.ReadinessProbe == nil && c.started && !c.init
	podIP := c.pod.podIP
	grace := gracePeriod(c.pod.pod)
	c.pod.mu.Unlock()
	c.pod.markChanged()
	c.pod.logf("container started", "container", c.spec.Name, "pid", pid, "argv", cmd.Args)

	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	probeCtx, stopProbes := context.WithCancel(context.Background())
	unhealthy := make(chan string, 1)
	var probes sync.WaitGroup
	if !c.init {
		probes.Go(func() { c.probe(probeCtx, pid, podIP, env, unhealthy) })
	}

	reason := ""
	select {
	case <-exited:
	case <-c.pod.stop:
		c.pod.mu.Lock()
		grace = c.pod.grace
		c.pod.mu.Unlock()
		c.kill(pid, grace, exited)
	case msg := <-unhealthy:
		c.pod.logf("container unhealthy, killing it", "container", c.spec.Name, "reason", msg)
		fmt.Fprintf(logf, "nodeagent: %s; killing the container\n", msg)
		reason = msg
		if lp := c.spec.LivenessProbe; lp != nil && lp.TerminationGracePeriodSeconds != nil {
			grace = time.Duration(*lp.TerminationGracePeriodSeconds) * time.Second
		}
		c.kill(pid, grace, exited)
	}
	stopProbes()
	probes.Wait()
	_ = syscall.Kill(-pid, syscall.SIGKILL) // what the process left in its group

	st := cmd.ProcessState
	t := corev1.ContainerStateTerminated{StartedAt: started, FinishedAt: metav1.Now(), ContainerID: "process://" + strconv.Itoa(pid)}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		t.Signal = int32(ws.Signal())
		t.ExitCode = 128 + t.Signal
	} else {
		t.ExitCode = int32(st.ExitCode())
	}
	t.Reason = "Completed"
	if t.ExitCode != 0 {
		t.Reason = "Error"
	}
	t.Message = c.terminationMessage(t.ExitCode)
	if reason != "" && t.Message == "" {
		t.Message = reason
	}
	c.terminated(t)
	c.pod.logf("container exited", "container", c.spec.Name, "pid", pid, "code", t.ExitCode)
	return t.ExitCode
}

func (c *container) terminated(t corev1.ContainerStateTerminated) {
	c.pod.mu.Lock()
	c.state = corev1.ContainerState{Terminated: &t}
	c.pid = 0
	c.ready = false
	c.pod.mu.Unlock()
	c.pod.markChanged()
}

// kill sends SIGTERM to the process group, then SIGKILL after grace, and waits for the exit.
func (c *container) kill(pid int, grace time.Duration, exited <-chan struct{}) {
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-exited:
	case <-t.C:
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-exited
	}
}

// terminationMessage is what the process wrote to its termination-message file or, with
// FallbackToLogsOnError and a failure, the tail of this run's log.
func (c *container) terminationMessage(code int32) string {
	b, err := readAtMost(filepath.Join(c.dir, "termination-log"), 0, maxMessageBytes, false)
	if err == nil && len(b) > 0 {
		return string(b)
	}
	if code == 0 || c.spec.TerminationMessagePolicy != corev1.TerminationMessageFallbackToLogsOnError {
		return ""
	}
	b, err = readAtMost(c.logPath(), c.logStart, maxLogTailBytes, true)
	if err != nil {
		return ""
	}
	lines := strings.SplitAfter(string(b), "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) > maxLogTailLines {
		lines = lines[len(lines)-maxLogTailLines:]
	}
	return strings.Join(lines, "")
}

// readAtMost reads up to n bytes of path from offset from: the first n, or the last n with tail.
func readAtMost(path string, from, n int64, tail bool) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	start := from
	if tail {
		if st, err := f.Stat(); err == nil && st.Size()-n > start {
			start = st.Size() - n
		}
	}
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		return nil, err
	}
	return io.ReadAll(io.LimitReader(f, n))
}

func (c *container) logPath() string {
	return logPath(c.pod.prov.opts.Dir, c.pod.pod.Namespace, c.pod.pod.Name, c.spec.Name)
}

// command prepares one run: the log (appended to, a marker line between runs), an empty
// termination-message file, and the command that runs the program in the pod's sandbox with
// its mounts.
func (c *container) command(env []string) (*exec.Cmd, *os.File, error) {
	if err := os.MkdirAll(filepath.Dir(c.logPath()), 0o755); err != nil {
		return nil, nil, fmt.Errorf("creating the log folder: %w", err)
	}
	logf, err := os.OpenFile(c.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("opening the log: %w", err)
	}
	fail := func(err error) (*exec.Cmd, *os.File, error) { return nil, logf, err }
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return fail(fmt.Errorf("creating %s: %w", c.dir, err))
	}
	termLog := filepath.Join(c.dir, "termination-log")
	if err := os.WriteFile(termLog, nil, 0o644); err != nil {
		return fail(fmt.Errorf("creating the termination-message file: %w", err))
	}
	c.pod.mu.Lock()
	pod := c.pod.pod.DeepCopy()
	vols := c.pod.volumes
	sb := c.pod.sandbox
	c.pod.mu.Unlock()

	argv := programArgv(c.pod.prov.opts.Binary, &c.spec, env)
	mounts, err := containerMounts(&c.spec, vols, termLog)
	if err != nil {
		return fail(err)
	}
	stage := filepath.Join(c.dir, "stage")
	if err := os.MkdirAll(stage, 0o700); err != nil {
		return fail(fmt.Errorf("creating %s: %w", stage, err))
	}
	ms := mountScript{binds: mounts, stage: stage, wd: c.spec.WorkingDir, argv: argv}
	if ms.wd == "" {
		ms.wd, ms.stagedWD = c.dir, true
	}
	mps, err := mountPoints()
	if err != nil {
		return fail(err)
	}
	ms.shadows = shadows(mounts, mps)
	if argv[0] == c.pod.prov.opts.Binary {
		ms.exe = argv[0]
	}
	script := ms.String()
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		return fail(fmt.Errorf("unshare(1) (util-linux) not found: %w", err))
	}
	args := []string{"--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh"}
	var cmd *exec.Cmd
	if sb != nil {
		cmd = sb.Command(unshare, args...)
	} else if pod.Spec.HostNetwork {
		cmd = exec.Command(unshare, args...)
	} else {
		return fail(errors.New("the pod has no sandbox"))
	}
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logf, "nodeagent: %s starting %q\n", time.Now().UTC().Format(time.RFC3339Nano), argv)
	st, err := logf.Stat()
	if err != nil {
		return fail(fmt.Errorf("reading the log's size: %w", err))
	}
	c.logStart = st.Size()
	return cmd, logf, nil
}

// programArgv is the program and arguments a container runs, with $(VAR) references expanded
// from its environment: command[0] "loopserve" (or a path ending in /loopserve) and an empty
// command run binary.
func programArgv(binary string, c *corev1.Container, env []string) []string {
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	lookup := func(name string) (string, bool) { v, ok := vars[name]; return v, ok }
	var argv []string
	for _, s := range c.Command {
		argv = append(argv, expand(s, lookup))
	}
	if len(argv) == 0 {
		argv = []string{binary}
	} else if argv[0] == "loopserve" || strings.HasSuffix(argv[0], "/loopserve") {
		argv[0] = binary
	}
	for _, s := range c.Args {
		argv = append(argv, expand(s, lookup))
	}
	return argv
}
