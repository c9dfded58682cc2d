package progress

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestReporterPlain(t *testing.T) {
	tests := []struct {
		name  string
		min   int64
		total int64
		want  []string // line prefixes, in order
	}{
		{name: "small work prints nothing", min: 1000, total: 1000, want: nil},
		{name: "large work logs quarters", min: 10, total: 1e6, want: []string{
			"loading m: 25% of 1.0 MB", "loading m: 50% of 1.0 MB",
			"loading m: 75% of 1.0 MB", "loading m: 100% of 1.0 MB", "loading m: done, 1.0 MB in ",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			r := New(&b, "loading m", tt.min)
			for done := int64(0); done <= tt.total; done += tt.total / 100 {
				r.Update(done, tt.total)
			}
			r.Done()
			var got []string
			for _, line := range strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n") {
				if line != "" {
					got = append(got, line)
				}
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d lines %q, want %d", len(got), got, len(tt.want))
			}
			for i := range got {
				if !strings.HasPrefix(got[i], tt.want[i]) {
					t.Errorf("line %d = %q, want prefix %q", i, got[i], tt.want[i])
				}
			}
			if diff := cmp.Diff(strings.Contains(b.String(), "\r"), false); diff != "" {
				t.Errorf("carriage return in non-terminal output (-got +want):\n%s", diff)
			}
		})
	}
}
