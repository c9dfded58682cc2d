package model

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestLoadGenerationConfig(t *testing.T) {
	for _, tc := range []struct {
		name, body string // body "" writes no file
		want       []int
		err        error
	}{
		{"no file", "", nil, nil},
		{"list", `{"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": false}`, []int{2, 0}, nil},
		{"one id", `{"eos_token_id": 7}`, []int{7}, nil},
		{"null", `{"eos_token_id": null}`, nil, nil},
		{"absent", `{"do_sample": true}`, nil, nil},
		{"not json", `{`, nil, ErrConfig},
		{"string", `{"eos_token_id": "2"}`, nil, ErrConfig},
		{"negative", `{"eos_token_id": [2, -1]}`, nil, ErrConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.body != "" {
				if err := os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(tc.body), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			g, err := LoadGenerationConfig(dir)
			if !errors.Is(err, tc.err) {
				t.Fatalf("error %v, want %v", err, tc.err)
			}
			if diff := cmp.Diff(g.EOSTokenIDs, tc.want); diff != "" {
				t.Errorf("EOSTokenIDs (-got +want):\n%s", diff)
			}
		})
	}
	g, err := LoadGenerationConfig(testdataDir + "/models/ouro-tiny-arith")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(g.EOSTokenIDs, []int{2, 0}); diff != "" {
		t.Errorf("ouro-tiny-arith EOSTokenIDs (-got +want):\n%s", diff)
	}
}
