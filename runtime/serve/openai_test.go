package serve

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/loopserve/loopserve/bus"
)

// TestRequestSeed: a seed the client gives fixes the sampling seed whatever the request id,
// seed 0 included (Job.Seed 0 would otherwise mean "derive from the id"); without one the seed
// follows the id, so a redelivery repeats the output.
func TestRequestSeed(t *testing.T) {
	entry := bus.ModelEntry{Namespace: "default", Name: "m", ContextLength: 64, MaxSteps: 4, Ready: true}
	seedOf := func(body, id string) uint64 {
		t.Helper()
		var r openAIRequest
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			t.Fatal(err)
		}
		j, aerr := r.toJob(id, entry, false, time.Now())
		if aerr != nil {
			t.Fatalf("%s: %s", body, aerr.Message)
		}
		return j.SeedFor(0)
	}
	for _, seed := range []string{"0", "1", "7", "-1"} {
		body := fmt.Sprintf(`{"model": "default/m", "prompt": "a", "temperature": 1, "seed": %s}`, seed)
		if a, b := seedOf(body, "cmpl-a"), seedOf(body, "cmpl-b"); a != b {
			t.Errorf("seed %s: sampling seeds %d and %d for two request ids, want one", seed, a, b)
		}
	}
	if seedOf(`{"prompt": "a", "seed": 0}`, "x") == seedOf(`{"prompt": "a", "seed": 1}`, "x") {
		t.Error("seeds 0 and 1 give the same sampling seed")
	}
	noSeed := `{"model": "default/m", "prompt": "a", "temperature": 1}`
	if a, b := seedOf(noSeed, "cmpl-a"), seedOf(noSeed, "cmpl-a"); a != b {
		t.Errorf("no seed: sampling seeds %d and %d for the same request id, want one", a, b)
	}
	if seedOf(noSeed, "cmpl-a") == seedOf(noSeed, "cmpl-b") {
		t.Error("no seed: two request ids share a sampling seed")
	}
}
