package main

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRead(t *testing.T) {
	tests := []struct {
		name                    string
		in                      string
		passed, failed, skipped int
		pkgFailed               []string
		wantOut                 []string // substrings of the printed report
	}{
		{
			name: "passes and skips",
			in: `{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN TestA\n"}
{"Action":"pass","Package":"p","Test":"TestA"}
{"Action":"skip","Package":"p","Test":"TestB"}
{"Action":"pass","Package":"p","Elapsed":1.5}`,
			passed: 1, skipped: 1,
			wantOut: []string{"ok  \tp\t1.5s"},
		},
		{
			name: "failed test prints its output",
			in: `{"Action":"output","Package":"p","Test":"TestA","Output":"boom: got 1 want 2\n"}
{"Action":"fail","Package":"p","Test":"TestA"}
{"Action":"fail","Package":"p","Elapsed":0.1}
{"Action":"fail","Package":"p","Elapsed":0.1}`,
			failed: 1, pkgFailed: []string{"p"},
			wantOut: []string{"boom: got 1 want 2", "FAIL\tp"},
		},
		{
			name: "build failure",
			in: `{"ImportPath":"q","Action":"build-output","Output":"q/x.go:1: undefined: y\n"}
{"ImportPath":"q","Action":"build-fail"}
not json at all`,
			pkgFailed: []string{"q"},
			wantOut:   []string{"undefined: y", "not json at all"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			s, err := read(strings.NewReader(tt.in), &out)
			if err != nil {
				t.Fatal(err)
			}
			got := []int{s.passed, s.failed, s.skipped}
			if diff := cmp.Diff(got, []int{tt.passed, tt.failed, tt.skipped}); diff != "" {
				t.Errorf("passed/failed/skipped (-got +want):\n%s", diff)
			}
			if diff := cmp.Diff(s.pkgFailed, tt.pkgFailed); diff != "" {
				t.Errorf("failed packages (-got +want):\n%s", diff)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("report lacks %q:\n%s", w, out.String())
				}
			}
		})
	}
}
