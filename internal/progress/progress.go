// Package progress reports long work (loading or writing a large checkpoint): one rewritten
// line on a terminal, plain log lines at each quarter otherwise, nothing for small work.
package progress

import (
	"fmt"
	"io"
	"os"
	"time"
)

// IsTerminal reports whether w is a character device (a terminal).
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// Reporter prints the progress of one piece of work to W. Work whose total is at most Min
// bytes prints nothing. The zero value is unusable: build one with New. Not safe for
// concurrent use.
type Reporter struct {
	w       io.Writer
	label   string
	min     int64
	tty     bool
	start   time.Time
	lastPct int
	total   int64
}

// New returns a Reporter for work called label ("loading DIR", "writing FILE").
func New(w io.Writer, label string, min int64) *Reporter {
	return &Reporter{w: w, label: label, min: min, tty: IsTerminal(w), start: time.Now(), lastPct: -1}
}

// Update records that done of total bytes are finished.
func (r *Reporter) Update(done, total int64) {
	r.total = total
	if total <= r.min {
		return
	}
	pct := int(100 * done / max(total, 1))
	switch {
	case r.tty && pct != r.lastPct:
		fmt.Fprintf(r.w, "\r%s: %3d%% of %.1f MB (%.0f s)", r.label, pct, float64(total)/1e6, time.Since(r.start).Seconds())
	case !r.tty && pct/25 != r.lastPct/25:
		fmt.Fprintf(r.w, "%s: %d%% of %.1f MB\n", r.label, pct, float64(total)/1e6)
	}
	r.lastPct = pct
}

// Done ends the line on a terminal and says how long the work took.
func (r *Reporter) Done() {
	if r.total <= r.min {
		return
	}
	if r.tty {
		fmt.Fprintln(r.w)
	}
	fmt.Fprintf(r.w, "%s: done, %.1f MB in %s\n", r.label, float64(r.total)/1e6, time.Since(r.start).Round(time.Millisecond))
}
