package defaultmodel

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestMatchesTestdata: Extract writes exactly the files that testdata/models/ouro-tiny-arith
// (the model the tests and `up` from the repository use) holds, byte for byte.
func TestMatchesTestdata(t *testing.T) {
	src := filepath.Join("..", "..", "..", "testdata", "models", Name)
	want, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := Extract(dir); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("extracted %d files, testdata has %d", len(got), len(want))
	}
	for _, e := range want {
		a, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs from testdata (%d vs %d bytes): copy it again", e.Name(), len(a), len(b))
		}
	}
}
