package nodeagent

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestPhase(t *testing.T) {
	running := corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}
	exited := func(code int32) corev1.ContainerState {
		return corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: code}}
	}
	waiting := corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}
	type ctr struct{ state, last corev1.ContainerState }
	tests := []struct {
		name     string
		policy   corev1.RestartPolicy
		initDone bool
		inits    []ctr
		mains    []ctr
		want     corev1.PodPhase
	}{
		{"initializing", corev1.RestartPolicyAlways, false, []ctr{{state: running}}, []ctr{{state: waiting}}, corev1.PodPending},
		{"init failed for good", corev1.RestartPolicyNever, false, []ctr{{state: exited(1)}}, []ctr{{state: waiting}}, corev1.PodFailed},
		{"init failed, retried", corev1.RestartPolicyOnFailure, false, []ctr{{state: exited(1)}}, []ctr{{state: waiting}}, corev1.PodPending},
		{"one not started", corev1.RestartPolicyAlways, true, nil, []ctr{{state: running}, {state: waiting}}, corev1.PodPending},
		{"running", corev1.RestartPolicyAlways, true, nil, []ctr{{state: running}, {state: exited(0)}}, corev1.PodRunning},
		{"back-off", corev1.RestartPolicyAlways, true, nil, []ctr{{state: waiting, last: exited(1)}}, corev1.PodRunning},
		{"always, all exited", corev1.RestartPolicyAlways, true, nil, []ctr{{state: exited(0)}}, corev1.PodRunning},
		{"never, all succeeded", corev1.RestartPolicyNever, true, nil, []ctr{{state: exited(0)}, {state: exited(0)}}, corev1.PodSucceeded},
		{"never, one failed", corev1.RestartPolicyNever, true, nil, []ctr{{state: exited(0)}, {state: exited(2)}}, corev1.PodFailed},
		{"on failure, succeeded", corev1.RestartPolicyOnFailure, true, nil, []ctr{{state: exited(0)}}, corev1.PodSucceeded},
		{"on failure, failed", corev1.RestartPolicyOnFailure, true, nil, []ctr{{state: exited(1)}}, corev1.PodRunning},
	}
	for _, tt := range tests {
		r := &podRun{pod: &corev1.Pod{Spec: corev1.PodSpec{RestartPolicy: tt.policy}}, initDone: tt.initDone}
		for _, c := range tt.inits {
			r.inits = append(r.inits, &container{pod: r, init: true, state: c.state, last: c.last})
		}
		for _, c := range tt.mains {
			r.mains = append(r.mains, &container{pod: r, state: c.state, last: c.last})
		}
		if got := r.phase(); got != tt.want {
			t.Errorf("%s: phase %s, want %s", tt.name, got, tt.want)
		}
	}
	r := &podRun{pod: &corev1.Pod{}, failReason: "SandboxFailed"}
	if got := r.phase(); got != corev1.PodFailed {
		t.Errorf("a pod whose sandbox failed: phase %s, want Failed", got)
	}
}
