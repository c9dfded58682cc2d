// Command testsum reads `go test -json` on stdin, prints each package's result as `go test`
// would, the output of every failed test, and a closing "N passed, N failed, N skipped" line.
// It exits non-zero when a test or package failed, or when no test ran at all: a suite that
// silently ran nothing must not look green.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
	// ImportPath is set on build events (build-output, build-fail) instead of Package.
	ImportPath string
}

type summary struct {
	passed, failed, skipped int
	pkgFailed               []string
	output                  map[string]*strings.Builder // "pkg test" -> output, kept until the test ends
}

func main() {
	s, err := read(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testsum:", err)
		os.Exit(2)
	}
	fmt.Printf("%d passed, %d failed, %d skipped\n", s.passed, s.failed, s.skipped)
	switch {
	case s.failed > 0 || len(s.pkgFailed) > 0:
		if len(s.pkgFailed) > 0 {
			fmt.Printf("FAIL: packages %s\n", strings.Join(s.pkgFailed, ", "))
		}
		os.Exit(1)
	case s.passed == 0:
		fmt.Println("FAIL: no test ran")
		os.Exit(1)
	}
}

func read(r io.Reader, w io.Writer) (*summary, error) {
	s := &summary{output: map[string]*strings.Builder{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			// Build errors and other non-JSON lines come through as text: keep them visible.
			fmt.Fprintln(w, string(line))
			continue
		}
		key := e.Package + " " + e.Test
		switch e.Action {
		case "build-output":
			fmt.Fprint(w, e.Output)
		case "build-fail":
			s.fail(e.ImportPath)
		case "output":
			b := s.output[key]
			if b == nil {
				b = &strings.Builder{}
				s.output[key] = b
			}
			b.WriteString(e.Output)
		case "pass", "fail", "skip":
			if e.Test == "" {
				pkgResult(w, s, e)
				continue
			}
			switch e.Action {
			case "pass":
				s.passed++
			case "skip":
				s.skipped++
			case "fail":
				s.failed++
				if b := s.output[key]; b != nil {
					fmt.Fprint(w, b.String())
				}
			}
			delete(s.output, key)
		}
	}
	sort.Strings(s.pkgFailed)
	return s, sc.Err()
}

// fail records a failed package once (go test reports some failures twice) and says whether it was new.
func (s *summary) fail(pkg string) bool {
	for _, p := range s.pkgFailed {
		if p == pkg {
			return false
		}
	}
	s.pkgFailed = append(s.pkgFailed, pkg)
	return true
}

func pkgResult(w io.Writer, s *summary, e event) {
	defer delete(s.output, e.Package+" ")
	switch e.Action {
	case "pass":
		fmt.Fprintf(w, "ok  \t%s\t%.1fs\n", e.Package, e.Elapsed)
	case "skip":
		fmt.Fprintf(w, "?   \t%s\t[no test files]\n", e.Package)
	case "fail":
		// Package-level output (TestMain, panics, build errors) explains a package failure.
		if b := s.output[e.Package+" "]; b != nil {
			fmt.Fprint(w, b.String())
		}
		if s.fail(e.Package) {
			fmt.Fprintf(w, "FAIL\t%s\t%.1fs\n", e.Package, e.Elapsed)
		}
	}
}
