package tokenizer

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
)

// slowSpans cuts text with the regexp2 engine alone: the oracle for the fast matchers.
func slowSpans(t testing.TB, pattern, text string) []span {
	t.Helper()
	s, err := newRegexSplit(pattern, isolated, false)
	if err != nil {
		t.Fatal(err)
	}
	s.fast = nil
	return s.spans(text)
}

func fastSpans(t testing.TB, pattern, text string) []span {
	t.Helper()
	s, err := newRegexSplit(pattern, isolated, false)
	if err != nil {
		t.Fatal(err)
	}
	if s.fast == nil {
		t.Fatalf("no fast matcher for %q", pattern)
	}
	return s.spans(text)
}

var splitSamples = []string{
	"", " ", "  ", "a", "hello world", "  leading and trailing  ", "x                 y",
	"it's don't we'll I'm you're they've IT'S DON'T 'ſ 'Ll 'x ''s",
	"line1\nline2\r\nline3\n\n\n", "   \t\t  mixed   whitespace \n  ", "a \n b\t\n\tc \r",
	"def f(x):\n    return x * 2  # comment\n", "1234567890123 3.14159 -42 ٤٥", "!!! ?? ..\n\n:)",
	"Café Ñandú Straße İstanbul ǅ", "循环语言模型，在有限的。", "🚀🚀 🤖\u200b\u0085\u00a0x\u3000y\u2028z",
	"\x00 nul and \u200b zero width", " 'hello' \"quoted\" (paren)", "\ta\n\tb", "x\u00a0\u00a0y",
}

func TestFastSplitMatchesRegexp2(t *testing.T) {
	for _, pattern := range []string{gpt2Pattern, qwenPattern} {
		for _, text := range splitSamples {
			if diff := cmp.Diff(fastSpans(t, pattern, text), slowSpans(t, pattern, text), cmp.AllowUnexported(span{})); diff != "" {
				t.Errorf("%.20q on %q (-fast +regexp2):\n%s", pattern, text, diff)
			}
		}
	}
}

// FuzzFastSplit checks the hand-written matchers against regexp2 on arbitrary text.
func FuzzFastSplit(f *testing.F) {
	for _, s := range splitSamples {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		if !utf8.ValidString(text) {
			text = strings.ToValidUTF8(text, "\uFFFD")
		}
		for _, pattern := range []string{gpt2Pattern, qwenPattern} {
			if diff := cmp.Diff(fastSpans(t, pattern, text), slowSpans(t, pattern, text), cmp.AllowUnexported(span{})); diff != "" {
				t.Fatalf("%.20q on %q (-fast +regexp2):\n%s", pattern, text, diff)
			}
		}
	})
}

func BenchmarkSplitQwen(b *testing.B) {
	text := proseText(b)
	for _, tc := range []struct {
		name string
		fast bool
	}{{"fast", true}, {"regexp2", false}} {
		b.Run(tc.name, func(b *testing.B) {
			s, err := newRegexSplit(qwenPattern, isolated, false)
			if err != nil {
				b.Fatal(err)
			}
			if !tc.fast {
				s.fast = nil
			}
			b.SetBytes(int64(len(text)))
			for b.Loop() {
				s.spans(text)
			}
		})
	}
}

func TestFastPathsInUse(t *testing.T) {
	if s, ok := qwen(t).steps[0].(*regexSplit); !ok || s.fast == nil {
		t.Errorf("qwen3 split step %#v has no fast matcher", qwen(t).steps[0])
	}
	if s, ok := tiny(t).steps[0].(*byteLevelStep); !ok || s.re == nil || s.re.fast == nil {
		t.Errorf("ouro ByteLevel step %#v has no fast matcher", tiny(t).steps[0])
	}
}
