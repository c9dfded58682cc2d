package cluster

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

var (
	cl   *Cluster
	k8s  client.Client
	skip string // why the tests skip; empty when the cluster runs
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	switch missing := Missing(assets); {
	case assets == "":
		skip = "KUBEBUILDER_ASSETS is unset: run with `make test` (hack/envtest-assets.sh --cluster builds the control plane)"
	case len(missing) > 0:
		skip = fmt.Sprintf("%s lacks %v: build them with hack/envtest-assets.sh --cluster", assets, missing)
	}
	if skip != "" {
		fmt.Println("cluster tests skipped:", skip)
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "cluster-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	cl, err = Start(Options{Assets: assets, Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if err := cl.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping the cluster:", err)
		}
	}()
	k8s, err = client.New(cl.Config, client.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

func needCluster(t *testing.T) {
	t.Helper()
	if skip != "" {
		t.Skip(skip)
	}
}

// await polls cond until it holds, failing the test when a component exits or a minute passes.
func await(t *testing.T, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		if err := cl.Err(); err != nil {
			return false, err
		}
		return cond(ctx)
	})
	if err != nil {
		t.Fatalf("awaiting %s: %v", what, err)
	}
}

// registerNodeWithoutKubelet registers a Ready Node that no kubelet serves: it stands in for the
// node agent so that this test sees the scheduler bind pods. Nothing runs them.
func registerNodeWithoutKubelet(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("8"),
		corev1.ResourceMemory: resource.MustParse("16Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}}}
	if err := k8s.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), node) })
	// The node lifecycle controller writes the new Node too (taints): retry on conflicts.
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(node), node); err != nil {
			return err
		}
		node.Status = corev1.NodeStatus{
			Capacity:    capacity,
			Allocatable: capacity,
			Conditions: []corev1.NodeCondition{{
				Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
				LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
			}},
		}
		return k8s.Status().Update(ctx, node)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDeploymentsScheduleAndScale runs a Deployment through the real controllers: the
// controller-manager creates the namespace's default ServiceAccount, the ReplicaSet and the
// Pods (with their service-account token volume, from the ServiceAccount admission plugin), the
// scheduler binds each Pod to the Node, and a scale-up adds a Pod.
func TestDeploymentsScheduleAndScale(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "deploy-"}}
	if err := k8s.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	await(t, "the namespace's default ServiceAccount", func(ctx context.Context) (bool, error) {
		err := k8s.Get(ctx, client.ObjectKey{Namespace: ns.Name, Name: "default"}, &corev1.ServiceAccount{})
		return err == nil, client.IgnoreNotFound(err)
	})
	registerNodeWithoutKubelet(t, "node-"+ns.Name)

	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns.Name},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](2),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "web", Image: "loopserve", Command: []string{"loopserve", "gateway"},
					Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1")}},
				}}},
			},
		},
	}
	if err := k8s.Create(ctx, dep); err != nil {
		t.Fatal(err)
	}
	boundPods := func(want int) func(ctx context.Context) (bool, error) {
		return func(ctx context.Context) (bool, error) {
			var pods corev1.PodList
			if err := k8s.List(ctx, &pods, client.InNamespace(ns.Name)); err != nil {
				return false, err
			}
			n := 0
			for _, p := range pods.Items {
				if p.Spec.NodeName == "node-"+ns.Name && p.DeletionTimestamp == nil {
					n++
				}
			}
			return n == want, nil
		}
	}
	await(t, "two Pods bound to the node", boundPods(2))

	var pods corev1.PodList
	if err := k8s.List(ctx, &pods, client.InNamespace(ns.Name)); err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		var owners []string
		for _, o := range p.OwnerReferences {
			owners = append(owners, o.Kind)
		}
		if diff := cmp.Diff(owners, []string{"ReplicaSet"}); diff != "" {
			t.Errorf("pod %s owners (-got +want):\n%s", p.Name, diff)
		}
		if !slices.ContainsFunc(p.Spec.Volumes, func(v corev1.Volume) bool {
			return strings.HasPrefix(v.Name, "kube-api-access-") && v.Projected != nil
		}) {
			t.Errorf("pod %s has no service-account token volume: %+v", p.Name, p.Spec.Volumes)
		}
		if p.Spec.ServiceAccountName != "default" {
			t.Errorf("pod %s runs as service account %q, want default", p.Name, p.Spec.ServiceAccountName)
		}
	}

	if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
		t.Fatal(err)
	}
	dep.Spec.Replicas = ptr.To[int32](3)
	if err := k8s.Update(ctx, dep); err != nil {
		t.Fatal(err)
	}
	await(t, "three Pods bound after the scale-up", boundPods(3))

	if err := k8s.Delete(ctx, dep, client.PropagationPolicy(metav1.DeletePropagationBackground)); err != nil {
		t.Fatal(err)
	}
	await(t, "the garbage collector deleting the ReplicaSet", func(ctx context.Context) (bool, error) {
		var rss appsv1.ReplicaSetList
		if err := k8s.List(ctx, &rss, client.InNamespace(ns.Name)); err != nil {
			return false, err
		}
		return len(rss.Items) == 0, nil
	})
}
