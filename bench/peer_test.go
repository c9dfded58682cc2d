package bench

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// testdata is the repository's reference data: models and goldens (testdata/README.md).
const testdata = "../testdata"

func testPeer(t *testing.T) Peer {
	t.Helper()
	p := Peer{Script: filepath.Join("..", "hack", "peer", "ouro.py")}
	if err := p.Available(t.Context()); err != nil {
		if errors.Is(err, ErrNoTorch) {
			t.Skipf("skipping the PyTorch peer: %v", err)
		}
		t.Fatal(err)
	}
	return p
}

func TestPeerMatchesGoldens(t *testing.T) {
	p := testPeer(t)
	for _, name := range []string{"ouro-tiny-random", "ouro-tiny-arith"} {
		t.Run(name, func(t *testing.T) {
			res, err := p.Check(t.Context(), filepath.Join(testdata, "models", name),
				filepath.Join(testdata, "golden", name+".safetensors"), filepath.Join(testdata, "golden", name+".json"))
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Prompts) == 0 {
				t.Fatal("peer checked no prompts")
			}
			for _, pr := range res.Prompts {
				if pr.StepLogitsDiff > 1e-3 || pr.GateLogitsDiff > 1e-4 {
					t.Errorf("%s: max abs diff step logits %g (tolerance 1e-3), gate logits %g (1e-4)", pr.Prompt, pr.StepLogitsDiff, pr.GateLogitsDiff)
				}
				if pr.GreedyFullMatch == nil || !*pr.GreedyFullMatch {
					t.Errorf("%s: greedy full-depth continuation through the KV cache differs from the golden", pr.Prompt)
				}
			}
			if !res.OK {
				t.Error("peer reported a mismatch")
			}
		})
	}
}

func TestPeerBench(t *testing.T) {
	p := testPeer(t)
	prefill, decode := Prompts(1024, 16, 8, 2, 1)
	res, err := p.Bench(t.Context(), filepath.Join(testdata, "models", "ouro-tiny-random"),
		PeerSpec{PrefillPrompt: prefill, DecodePrompts: decode, DecodeTokens: 4, Repeats: 1})
	if err != nil {
		t.Fatal(err)
	}
	if res.LoopSteps != 4 || res.PrefillTokens != 16 || res.DecodeTokens != 3 || res.Batch != 2 {
		t.Errorf("peer bench counts = %+v, want 4 loop steps, 16 prefill tokens, 3 decode tokens, batch 2", res)
	}
	if res.OMPWaitPolicy == "" {
		t.Error("peer bench did not record its OpenMP wait policy")
	}
	if res.PrefillTokS <= 0 || res.DecodeTokSB1 <= 0 || res.DecodeTokSBN <= 0 {
		t.Errorf("peer bench rates = %+v, want positive", res)
	}
}

func TestPeerBenchBadModel(t *testing.T) {
	p := testPeer(t)
	_, err := p.Bench(context.Background(), t.TempDir(), PeerSpec{PrefillPrompt: []int{5}, DecodePrompts: [][]int{{5}}, DecodeTokens: 2})
	if err == nil {
		t.Fatal("Bench on an empty folder returned no error")
	}
}

func TestPrompts(t *testing.T) {
	a, b := Prompts(100, 7, 3, 4, 42)
	c, d := Prompts(100, 7, 3, 4, 42)
	if len(a) != 7 || len(b) != 4 || len(b[3]) != 3 {
		t.Fatalf("Prompts shapes: %d, %d×%d; want 7, 4×3", len(a), len(b), len(b[3]))
	}
	for _, id := range append(append([]int{}, a...), b[0]...) {
		if id < 5 || id >= 100 {
			t.Errorf("prompt id %d outside [5, 100)", id)
		}
	}
	if diff := cmp.Diff(append([][]int{a}, b...), append([][]int{c}, d...)); diff != "" {
		t.Errorf("Prompts with the same seed differ (-first +second):\n%s", diff)
	}
}
