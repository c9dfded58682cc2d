package serve

import (
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/engine"
)

// TestLoadStopTokens: a worker stops at every eos id the checkpoint declares, as Hugging Face
// and vLLM do: the tokenizer's and config.json's <|im_end|> (2) and generation_config.json's
// list [2, 0], which adds <|endoftext|> (0).
func TestLoadStopTokens(t *testing.T) {
	l, err := Load(modelDir, engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := slices.Sorted(slices.Values(l.Worker.StopTokens))
	if diff := cmp.Diff(got, []int{0, 2}); diff != "" {
		t.Errorf("stop tokens (-got +want):\n%s", diff)
	}
}
