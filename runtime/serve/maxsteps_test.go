package serve

import (
	"context"
	"net/http"
	"strings"
	"testing"
)

// TestWorkerMaxStepsCapsDepth: a worker whose MaxSteps is below the model's loop steps (a
// LoopModel's spec.loop.maxSteps) runs no token deeper, even for a request whose threshold of 1
// asks for every step, and refuses a max_depth beyond it.
func TestWorkerMaxStepsCapsDepth(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{MaxSteps: 2})
	ctx := context.Background()

	deep, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt,
		"max_tokens": 6, "temperature": 0, "exit_threshold": 1})
	if err != nil || deep.Status != http.StatusOK {
		t.Fatalf("exit_threshold 1: %v %+v", err, deep)
	}
	if len(deep.Depths) == 0 {
		t.Fatalf("no loop depths in %+v", deep)
	}
	for i, d := range deep.Depths {
		if d != 2 {
			t.Errorf("token %d ran %d loop steps, want the worker's cap 2 (threshold 1 runs every allowed step)", i, d)
		}
	}

	tooDeep, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt,
		"max_tokens": 2, "max_depth": 3})
	if err != nil {
		t.Fatal(err)
	}
	if tooDeep.Status != http.StatusBadRequest || !strings.Contains(tooDeep.Error, "max_depth 3") {
		t.Errorf("max_depth 3 above the cap: status %d error %q, want 400 naming max_depth 3", tooDeep.Status, tooDeep.Error)
	}
}
