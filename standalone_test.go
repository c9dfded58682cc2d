// Package loopserve_test holds checks of the repository as a whole: it must stand alone, with
// every file its tests, benchmarks and tools read inside it.
package loopserve_test

import (
	"bytes"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// outside is a path that would reach data beside the clone; spelt in two pieces so this file
// does not name it.
var outside = []string{".." + "/shared", "shared" + "/golden", "shared" + "/models"}

// projectFiles lists the repository's files and symbolic links (no .git, no build output), as
// paths relative to the root.
func projectFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == ".git" || path == "bin" {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.IsDir() {
			files = append(files, filepath.ToSlash(path))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// TestNothingReadsOutsideTheRepository: no file of the project names the reference folder that
// sat beside the clone during development; a fresh clone has none.
func TestNothingReadsOutsideTheRepository(t *testing.T) {
	for _, path := range projectFiles(t) {
		if fi, err := os.Lstat(path); err != nil || fi.Mode()&fs.ModeSymlink != 0 {
			continue // a link's target is walked in its own place
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range outside {
			if i := bytes.Index(b, []byte(s)); i >= 0 {
				line := 1 + bytes.Count(b[:i], []byte("\n"))
				t.Errorf("%s:%d names %q: the repository must carry what it reads (testdata/)", path, line, s)
			}
		}
	}
}

// TestTestdataDocumented: every file under testdata/ is named in testdata/README.md, and every
// path the README names in backticks exists.
func TestTestdataDocumented(t *testing.T) {
	readme, err := os.ReadFile("testdata/README.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(readme)
	for _, path := range projectFiles(t) {
		rel, ok := strings.CutPrefix(path, "testdata/")
		if ok && rel != "README.md" && !strings.Contains(doc, "`"+rel+"`") {
			t.Errorf("testdata/%s is not listed in testdata/README.md", rel)
		}
	}
	for _, m := range regexp.MustCompile("`((?:models|golden)/[^`<>]+)`").FindAllStringSubmatch(doc, -1) {
		if _, err := os.Stat(filepath.Join("testdata", m[1])); err != nil {
			t.Errorf("testdata/README.md names %s: %v", m[1], err)
		}
	}
}

// TestGoldenTokenizersResolve: each tokenizer golden names its tokenizer relative to itself,
// and that file is in the repository.
func TestGoldenTokenizersResolve(t *testing.T) {
	goldens, err := filepath.Glob("testdata/golden/tokenizers/*.json")
	if err != nil {
		t.Fatal(err)
	}
	goldens = append(goldens, "testdata/golden/tokenizers/qwen3/golden.json")
	slices.Sort(goldens)
	if len(goldens) != 3 {
		t.Fatalf("tokenizer goldens = %v, want the two tiny ones and qwen3", goldens)
	}
	for _, g := range goldens {
		b, err := os.ReadFile(g)
		if err != nil {
			t.Fatal(err)
		}
		var head struct {
			Tokenizer string `json:"tokenizer"`
			Cases     []json.RawMessage
		}
		if err := json.Unmarshal(b, &head); err != nil {
			t.Fatalf("%s: %v", g, err)
		}
		tok := filepath.Join(filepath.Dir(g), head.Tokenizer)
		if _, err := os.Stat(tok); err != nil {
			t.Errorf("%s names tokenizer %s: %v", g, head.Tokenizer, err)
		}
		if len(head.Cases) == 0 {
			t.Errorf("%s has no cases", g)
		}
	}
}

// TestReadmeCommands: the README opens with the two commands a newcomer needs, `loopserve up`
// and the test command, and .ci/run calls exactly that test command.
func TestReadmeCommands(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)```sh\n(.*?)```").FindSubmatch(readme)
	if block == nil {
		t.Fatal("README.md has no sh block")
	}
	var cmds []string
	for line := range strings.Lines(string(block[1])) {
		cmd, _, _ := strings.Cut(line, "#")
		if cmd = strings.TrimSpace(cmd); cmd != "" {
			cmds = append(cmds, cmd)
		}
	}
	if len(cmds) != 2 || !strings.HasPrefix(cmds[0], "go run") || !strings.HasSuffix(cmds[0], "./cmd/loopserve up") {
		t.Fatalf("README's first block = %q, want [go run ... ./cmd/loopserve up, <test command>]", cmds)
	}
	ci, err := os.ReadFile(".ci/run")
	if err != nil {
		t.Fatal(err)
	}
	var calls []string
	for line := range strings.Lines(string(ci)) {
		if l := strings.TrimSpace(line); l == cmds[1] {
			calls = append(calls, l)
		}
	}
	if len(calls) != 1 {
		t.Errorf(".ci/run calls %q %d times, want once", cmds[1], len(calls))
	}
}
