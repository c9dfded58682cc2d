package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestLoopModelName(t *testing.T) {
	for _, tc := range []struct{ dir, want string }{
		{"testdata/models/ouro-tiny-arith", "ouro-tiny-arith"},
		{"/models/Ouro-1.4B/", "ouro-1-4b"},
		{"/x/__", "ouro-tiny-arith"},
		{"/m/my_model.v2", "my-model-v2"},
	} {
		if got := loopModelName(tc.dir); got != tc.want {
			t.Errorf("loopModelName(%q) = %q, want %q", tc.dir, got, tc.want)
		}
	}
}

// TestResolveModelEmbedded runs where no testdata/ exists: the embedded model is extracted and
// removed again by cleanup.
func TestResolveModelEmbedded(t *testing.T) {
	t.Chdir(t.TempDir())
	dir, cleanup, err := resolveModel("")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("extracted model lacks %s: %v", f, err)
		}
	}
	cleanup()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cleanup left %s: %v", dir, err)
	}
	if got, _, _ := resolveModel("/some/dir"); got != "/some/dir" {
		t.Errorf("resolveModel(flag) = %q", got)
	}
}
