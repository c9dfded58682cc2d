package controllers

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// TestAPIServerSmoke proves the envtest API server is a real one backed by etcd: a Namespace
// written is read back with a server-assigned UID and the labels it was given.
func TestAPIServerSmoke(t *testing.T) {
	ctx := context.Background()
	name := fmt.Sprintf("smoke-%d", time.Now().UnixNano()%1e9)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"loopserve.io/test": "smoke"}}}
	if err := k8s.Create(ctx, ns); err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	var got corev1.Namespace
	if err := k8s.Get(ctx, client.ObjectKey{Name: name}, &got); err != nil {
		t.Fatalf("reading namespace back: %v", err)
	}
	if got.UID == "" || got.Labels["loopserve.io/test"] != "smoke" || got.Status.Phase != corev1.NamespaceActive {
		t.Errorf("namespace read back = uid %q labels %v phase %q, want a server-assigned uid, label smoke, phase Active", got.UID, got.Labels, got.Status.Phase)
	}
}
