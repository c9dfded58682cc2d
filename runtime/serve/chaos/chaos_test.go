package chaos

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var modelDir = filepath.Join("..", "..", "..", "testdata", "models", "ouro-tiny-arith")

// TestClusterFaults is the fault test of the serving path: a 3-node JetStream cluster (R3 queue
// and registry, fsync always), the real gateway and two real workers on the tiny model, 16
// streaming clients. The stream's leader is killed and later restarted, then the node the
// gateway is connected to, and a worker is killed mid-generation. Every request the gateway accepted must complete exactly once with the
// reference output or end in a clean error; none may be lost or duplicated, and no client may
// hang until the request timeout.
func TestClusterFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("a cluster fault run takes half a minute")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rep, err := Run(ctx, Options{ModelDir: modelDir, Dir: t.TempDir(), Clients: 16, Settle: 24,
		Plan: []Fault{KillStreamLeader, RestartNodes, KillGatewayNode, RestartNodes, KillWorker},
		Logf: func(format string, args ...any) { t.Logf(format, args...) }})
	if rep != nil {
		var b strings.Builder
		rep.Print(&b)
		t.Log("\n" + b.String())
	}
	if err != nil {
		t.Fatal(err)
	}
	if rep.Lost != 0 || rep.Duplicated != 0 || rep.Corrupted != 0 {
		t.Errorf("lost %d, duplicated %d, corrupted %d; want none", rep.Lost, rep.Duplicated, rep.Corrupted)
	}
	if rep.Accepted != rep.Completed+rep.FailedCleanly-rep.Refused {
		t.Errorf("accepted %d != completed %d + failed after queueing %d", rep.Accepted, rep.Completed, rep.FailedCleanly-rep.Refused)
	}
	if rep.Completed < 5*24 {
		t.Errorf("%d requests completed, want at least the %d the plan awaited", rep.Completed, 5*24)
	}
	if got := len(rep.Faults); got != 5 {
		t.Errorf("%d faults injected, want 5", got)
	}
}
