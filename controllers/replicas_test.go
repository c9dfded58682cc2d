package controllers

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// startNATSCluster runs three embedded NATS servers clustered on loopback with JetStream and
// returns their client URLs, comma-separated.
func startNATSCluster(t *testing.T) string {
	t.Helper()
	var lns []net.Listener
	for range 6 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
	}
	port := func(i int) int { return lns[i].Addr().(*net.TCPAddr).Port }
	var routes []*url.URL
	var clients []string
	for i := range 3 {
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", port(3+i))})
		clients = append(clients, fmt.Sprintf("nats://127.0.0.1:%d", port(i)))
	}
	for _, ln := range lns {
		ln.Close()
	}
	dir := t.TempDir()
	var servers []*server.Server
	for i := range 3 {
		s, err := server.NewServer(&server.Options{ServerName: fmt.Sprintf("n%d", i), Host: "127.0.0.1", Port: port(i),
			Cluster: server.ClusterOpts{Name: "test", Host: "127.0.0.1", Port: port(3 + i)}, Routes: routes,
			JetStream: true, StoreDir: filepath.Join(dir, fmt.Sprint(i)), NoLog: true, NoSigs: true})
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		servers = append(servers, s)
		t.Cleanup(s.Shutdown)
	}
	for _, s := range servers {
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("NATS node not ready")
		}
	}
	await(t, waitLong, "JetStream meta leader", func() error {
		for _, s := range servers {
			if s.JetStreamIsLeader() {
				return nil
			}
		}
		return fmt.Errorf("no meta leader")
	})
	return strings.Join(clients, ",")
}

// TestNATSReplicas: spec.nats.replicas replicates the LoopModel's stream and the registry
// buckets on a 3-node cluster; raising it updates the existing stream; a LoopModel asking for
// fewer never lowers the shared buckets.
func TestNATSReplicas(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	urls := startNATSCluster(t)
	nc, err := nats.Connect(urls)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	replicasOf := func(stream string) func() (int, error) {
		return func() (int, error) {
			s, err := js.Stream(ctx, stream)
			if err != nil {
				return 0, err
			}
			return s.CachedInfo().Config.Replicas, nil
		}
	}
	awaitReplicas := func(what string, get func() (int, error), want int) {
		t.Helper()
		await(t, waitLong, what, func() error {
			n, err := get()
			if err == nil && n != want {
				err = fmt.Errorf("%d replicas, want %d", n, want)
			}
			return err
		})
	}
	a := bus.Ref{Namespace: ns, Name: "a"}
	if err := k8s.Create(ctx, newLoopModel(ns, "a", urls)); err != nil {
		t.Fatal(err)
	}
	awaitReplicas("stream a at the default", replicasOf(a.Stream()), 1)
	updateLoopModel(t, ns, "a", func(lm *v1alpha1.LoopModel) { lm.Spec.NATS.Replicas = 3 })
	awaitReplicas("stream a raised to R3", replicasOf(a.Stream()), 3)
	awaitReplicas("registry R3", replicasOf("KV_"+bus.RegistryBucket), 3)
	awaitReplicas("liveness bucket R3", replicasOf("KV_"+bus.GatewaysBucket), 3)
	await(t, waitLong, "a not Degraded", conditionIs(ns, "a", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))

	b := newLoopModel(ns, "b", urls)
	b.Spec.NATS.Replicas = 1
	if err := k8s.Create(ctx, b); err != nil {
		t.Fatal(err)
	}
	awaitReplicas("stream b R1", replicasOf(bus.Ref{Namespace: ns, Name: "b"}.Stream()), 1)
	await(t, waitLong, "b not Degraded", conditionIs(ns, "b", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
	if n, err := replicasOf("KV_" + bus.RegistryBucket)(); err != nil || n != 3 {
		t.Errorf("registry after an R1 LoopModel: %d replicas (%v), want still 3", n, err)
	}
}
