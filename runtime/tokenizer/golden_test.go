package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// goldenDir holds the reference encodings from Hugging Face tokenizers (testdata/README.md).
const goldenDir = "../../testdata/golden/tokenizers"

type goldenFile struct {
	Tokenizer string `json:"tokenizer"`
	VocabSize int    `json:"vocab_size"`
	Cases     []struct {
		Text    string `json:"text"`
		IDs     []int  `json:"ids"`
		Decoded string `json:"decoded"`
	} `json:"cases"`
}

func readGolden(t testing.TB, name string) (goldenFile, string) {
	t.Helper()
	path := filepath.Join(goldenDir, name)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden: %v", err)
	}
	var g goldenFile
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatalf("parsing %s: %v", path, err)
	}
	return g, filepath.Join(filepath.Dir(path), g.Tokenizer)
}

var (
	qwenOnce sync.Once
	qwenTok  *Tokenizer
	qwenErr  error
)

// qwen loads the 151,669-token tokenizer once per test binary.
func qwen(t testing.TB) *Tokenizer {
	t.Helper()
	qwenOnce.Do(func() {
		qwenTok, qwenErr = Load(filepath.Join(goldenDir, "qwen3", "tokenizer.json"))
	})
	if qwenErr != nil {
		t.Fatal(qwenErr)
	}
	return qwenTok
}

func TestGoldens(t *testing.T) {
	for _, name := range []string{"ouro-tiny-arith.json", "ouro-tiny-random.json", "qwen3/golden.json"} {
		t.Run(name, func(t *testing.T) {
			g, tokPath := readGolden(t, name)
			var tok *Tokenizer
			if name == "qwen3/golden.json" {
				tok = qwen(t) // loaded once for all tests: it is the slow one under -race
			} else {
				var err error
				if tok, err = Load(tokPath); err != nil {
					t.Fatal(err)
				}
			}
			if got := tok.VocabSize(); got != g.VocabSize {
				t.Errorf("VocabSize() = %d, want %d", got, g.VocabSize)
			}
			slow := withoutFastPaths(tok)
			for i, c := range g.Cases {
				if diff := cmp.Diff(tok.Encode(c.Text), c.IDs); diff != "" {
					t.Errorf("case %d %.40q: Encode (-got +want):\n%s", i, c.Text, diff)
				}
				if diff := cmp.Diff(slow.Encode(c.Text), c.IDs); diff != "" {
					t.Errorf("case %d %.40q: Encode with regexp2 only (-got +want):\n%s", i, c.Text, diff)
				}
				if got := tok.Decode(c.IDs); got != c.Decoded {
					t.Errorf("case %d: Decode = %q, want %q", i, got, c.Decoded)
				}
			}
		})
	}
}

// withoutFastPaths returns a copy of tk whose split steps all run on regexp2.
func withoutFastPaths(tk *Tokenizer) *Tokenizer {
	c := *tk
	c.steps = nil
	for _, s := range tk.steps {
		switch s := s.(type) {
		case *regexSplit:
			cp := *s
			cp.fast = nil
			c.steps = append(c.steps, &cp)
		case *byteLevelStep:
			cp := *s
			if s.re != nil {
				re := *s.re
				re.fast = nil
				cp.re = &re
			}
			c.steps = append(c.steps, &cp)
		default:
			c.steps = append(c.steps, s)
		}
	}
	return &c
}
