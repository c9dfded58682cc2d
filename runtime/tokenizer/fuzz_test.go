package tokenizer

import (
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

var (
	tinyOnce sync.Once
	tinyTok  *Tokenizer
	tinyErr  error
)

// tiny loads the default model's tokenizer (no normalizer) once per test binary.
func tiny(t testing.TB) *Tokenizer {
	t.Helper()
	tinyOnce.Do(func() { tinyTok, tinyErr = LoadDir(modelDir) })
	if tinyErr != nil {
		t.Fatal(tinyErr)
	}
	return tinyTok
}

// containsAdded reports whether text spells an added token, which would encode to
// that token rather than round-trip as plain text.
func containsAdded(tk *Tokenizer, text string) bool {
	for s := range tk.addedText {
		if strings.Contains(text, s) {
			return true
		}
	}
	return false
}

// FuzzRoundTrip checks that valid UTF-8 without added tokens decodes back to itself (to
// its NFC form for the qwen3 tokenizer, whose normalizer is NFC), that every id is in
// range, and that streaming decode agrees with Decode.
func FuzzRoundTrip(f *testing.F) {
	for _, s := range []string{"", " ", "hello world", "x = 3 ; k = x + 4 ; ? k =", "it's  don't\n\n\t", "🚀é\u0301中"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		if !utf8.ValidString(text) {
			return
		}
		for _, tc := range []struct {
			tk   *Tokenizer
			want string
		}{{tiny(t), text}, {qwen(t), norm.NFC.String(text)}} {
			if containsAdded(tc.tk, text) {
				continue
			}
			ids := tc.tk.Encode(text)
			for _, id := range ids {
				if id < 0 || id >= tc.tk.VocabSize() {
					t.Fatalf("Encode(%q) gave id %d outside [0, %d)", text, id, tc.tk.VocabSize())
				}
			}
			got := tc.tk.Decode(ids)
			if got != tc.want {
				t.Fatalf("Decode(Encode(%q)) = %q, want %q (ids %v)", text, got, tc.want, ids)
			}
			if s := streamDecode(t, tc.tk, ids); s != got {
				t.Fatalf("streamed %q, Decode gave %q", s, got)
			}
		}
		// The input's bytes read as ids (some out of range, some splitting runes) must
		// decode to valid UTF-8, streamed or not, the same way.
		tk := tiny(t)
		ids := make([]int, len(text))
		for i := range len(text) {
			ids[i] = int(text[i])*5 - 40
		}
		got := tk.Decode(ids)
		if !utf8.ValidString(got) {
			t.Fatalf("Decode(%v) = %q: not valid UTF-8", ids, got)
		}
		if s := streamDecode(t, tk, ids); s != got {
			t.Fatalf("streamed %q, Decode gave %q (ids %v)", s, got, ids)
		}
	})
}

// FuzzParse feeds arbitrary bytes to the tokenizer.json loader: it must return an error
// or a tokenizer that encodes and decodes without panicking.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}`))
	f.Add(synthJSON(synthMerges, true, `{"type":"NFC"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		tk, err := Parse(data)
		if err != nil {
			return
		}
		// A short text: the input may carry a Split regex that backtracks exponentially,
		// which is the tokenizer file's doing (it is trusted like the weights), not a bug.
		ids := tk.Encode("a1 é<|im_end|>")
		_ = tk.Decode(append(ids, -1, 0, tk.VocabSize()))
		_, _ = tk.ApplyChat([]Message{{Role: "user", Content: "hi"}}, true)
	})
}

func TestTinyRoundTripProse(t *testing.T) {
	tk := tiny(t)
	g, _ := readGolden(t, filepath.Join("qwen3", "golden.json"))
	for _, c := range g.Cases {
		if containsAdded(tk, c.Text) {
			continue
		}
		if got := tk.Decode(tk.Encode(c.Text)); got != c.Text {
			t.Errorf("round trip of %.40q gave %.40q", c.Text, got)
		}
	}
}
