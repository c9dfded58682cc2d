package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/controllers"
)

// TestOperatorWorkerArgsParse: the command line the operator gives worker pods is one that
// `loopserve worker` accepts, with the values meant.
func TestOperatorWorkerArgsParse(t *testing.T) {
	lm := &v1alpha1.LoopModel{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "ouro"},
		Spec: v1alpha1.LoopModelSpec{
			Model: v1alpha1.ModelSpec{Source: v1alpha1.ModelSource{HostPath: &v1alpha1.HostPathSource{Path: "/data"}}, Path: "ouro-1.4b", ContextLength: 8192},
			Loop:  v1alpha1.LoopSpec{MaxSteps: 4, ExitThreshold: 0.9, ProbeFraction: ptr.To(0.05), KVPolicy: v1alpha1.KVLast},
		},
	}
	dep, err := controllers.DesiredDeployment(lm, "nats://nats:4222", "loopserve:1")
	if err != nil {
		t.Fatal(err)
	}
	args := dep.Spec.Template.Spec.Containers[0].Args
	if len(args) == 0 || args[0] != "worker" {
		t.Fatalf("args = %v, want the worker subcommand first", args)
	}
	cmd := newWorkerCmd()
	if err := cmd.ParseFlags(args[1:]); err != nil {
		t.Fatalf("loopserve worker refuses the operator's args %v: %v", args, err)
	}
	got := map[string]string{}
	for _, name := range []string{"nats", "model", "loopmodel", "threshold-file", "metrics-listen", "kv-policy", "probe-fraction", "capacity", "drain", "max-steps", "context-length"} {
		f := cmd.Flags().Lookup(name)
		if f == nil {
			t.Fatalf("worker has no --%s flag", name)
		}
		got[name] = f.Value.String()
	}
	want := map[string]string{
		"nats": "nats://nats:4222", "model": "/models/ouro-1.4b", "loopmodel": "ml/ouro",
		"threshold-file": "/etc/loopserve/threshold.json", "metrics-listen": ":9090",
		"kv-policy": "last", "probe-fraction": "0.05", "capacity": "8", "drain": "50s",
		"max-steps": "4", "context-length": "8192",
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("parsed worker flags (-got +want):\n%s", diff)
	}
}

// TestLeaseNamespace: without --leader-election-namespace the Lease goes to the pod's namespace
// in a cluster, and to the kubeconfig context's namespace from a workstation.
func TestLeaseNamespace(t *testing.T) {
	saved := inClusterNamespace
	t.Cleanup(func() { inClusterNamespace = saved })
	dir := t.TempDir()
	kubeconfig := func(ns string) string {
		f := filepath.Join(dir, "kubeconfig-"+ns)
		cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: %q}}]
current-context: x
`, ns)
		if err := os.WriteFile(f, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	podNamespace := filepath.Join(dir, "namespace")
	tests := []struct {
		name       string
		kubeconfig string
		inCluster  bool
		want       string
	}{
		{"context namespace", kubeconfig("ops"), false, "ops"},
		{"context without namespace", kubeconfig(""), false, "default"},
		{"in a pod", kubeconfig("ops"), true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inClusterNamespace = filepath.Join(dir, "absent")
			if tt.inCluster {
				if err := os.WriteFile(podNamespace, []byte("loopserve-system"), 0o600); err != nil {
					t.Fatal(err)
				}
				inClusterNamespace = podNamespace
			}
			got, err := leaseNamespace(tt.kubeconfig)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("lease namespace = %q, want %q", got, tt.want)
			}
		})
	}
}
