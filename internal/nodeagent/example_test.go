package nodeagent_test

import (
	"context"
	"log"
	"net/netip"
	"os"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/loopserve/loopserve/internal/cluster"
	"github.com/loopserve/loopserve/internal/nodeagent"
	"github.com/loopserve/loopserve/internal/podnet"
)

// A one-machine cluster whose pods run as local processes: the pod network first (the API
// server listens on its bridge address, where pods reach it), then the control plane, then a
// node agent running the local loopserve binary for every container.
func Example() {
	pods, err := podnet.New("lsbr0", netip.MustParsePrefix("10.244.0.0/24"))
	if err != nil {
		log.Fatal(err)
	}
	defer pods.Close()
	cl, err := cluster.Start(cluster.Options{Assets: os.Getenv("KUBEBUILDER_ASSETS"), Dir: "/tmp/cluster", Address: pods.Gateway()})
	if err != nil {
		log.Fatal(err)
	}
	defer cl.Stop()
	agent, err := nodeagent.Start(context.Background(), nodeagent.Options{
		Config:    cl.Config,
		NodeName:  "node-1",
		Binary:    "/work/bin/loopserve",
		Dir:       "/tmp/node-1",
		Network:   pods,
		Capacity:  corev1.ResourceList{"nvidia.com/gpu": resource.MustParse("1")}, // runs the CPU engine
		APIServer: cl.APIServer,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer agent.Stop()
	log.Println("worker log:", agent.LogPath("default", "worker-0", "worker"))
}
