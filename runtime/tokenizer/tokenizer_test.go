package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
)

// synthJSON builds a small byte-level tokenizer.json: the 256 byte tokens (ids 0..255),
// merged tokens from merges in order (ids 256..), and the given added tokens. Merges are
// written as "a b" strings when legacy is set, else as pairs.
func synthJSON(merges [][2]string, legacy bool, normalizer string, added ...map[string]any) []byte {
	vocab := map[string]int{}
	for b := range 256 {
		vocab[string(byteChar[b])] = b
	}
	var ms []any
	for _, m := range merges {
		if _, ok := vocab[m[0]+m[1]]; !ok {
			vocab[m[0]+m[1]] = len(vocab)
		}
		if legacy {
			ms = append(ms, m[0]+" "+m[1])
		} else {
			ms = append(ms, []string{m[0], m[1]})
		}
	}
	for i, a := range added {
		if _, ok := a["id"]; !ok {
			a["id"] = 1000 + i
		}
	}
	if added == nil {
		added = []map[string]any{}
	}
	f := map[string]any{
		"version":        "1.0",
		"added_tokens":   added,
		"normalizer":     json.RawMessage(normalizer),
		"pre_tokenizer":  map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
		"post_processor": nil,
		"decoder":        map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
		"model":          map[string]any{"type": "BPE", "dropout": nil, "unk_token": nil, "vocab": vocab, "merges": ms},
	}
	data, err := json.Marshal(f)
	if err != nil {
		panic(err)
	}
	return data
}

// synthMerges spell "hello" and " world" (Ġ stands for the space byte).
var synthMerges = [][2]string{{"l", "l"}, {"h", "e"}, {"he", "ll"}, {"hell", "o"}, {"Ġ", "w"}, {"o", "r"}, {"Ġw", "or"}, {"l", "d"}, {"Ġwor", "ld"}}

func mustParse(t *testing.T, data []byte) *Tokenizer {
	t.Helper()
	tok, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestMergeEncodings(t *testing.T) {
	pairs := mustParse(t, synthJSON(synthMerges, false, "null"))
	legacy := mustParse(t, synthJSON(synthMerges, true, "null"))
	hello, _ := pairs.TokenID("hello")
	world, _ := pairs.TokenID("Ġworld")
	for _, tc := range []struct {
		text string
		want []int
	}{
		{"hello world", []int{hello, world}},
		{"hello  world", []int{hello, ' ', world}},
		{"hellohello", []int{hello, hello}}, // one pre-token, merged twice
		{"helo", []int{pairs.mustID(t, "he"), 'l', 'o'}},
	} {
		if diff := cmp.Diff(pairs.Encode(tc.text), tc.want); diff != "" {
			t.Errorf("pairs Encode(%q) (-got +want):\n%s", tc.text, diff)
		}
		if diff := cmp.Diff(legacy.Encode(tc.text), tc.want); diff != "" {
			t.Errorf("legacy Encode(%q) (-got +want):\n%s", tc.text, diff)
		}
	}
}

func (t *Tokenizer) mustID(tb testing.TB, s string) int {
	tb.Helper()
	id, ok := t.TokenID(s)
	if !ok {
		tb.Fatalf("no token %q", s)
	}
	return id
}

func TestAddedTokenFlags(t *testing.T) {
	tok := func(content string, flags ...string) map[string]any {
		m := map[string]any{"content": content, "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}
		for _, f := range flags {
			m[f] = true
		}
		return m
	}
	const nfc = `{"type": "NFC"}`
	for _, tc := range []struct {
		name  string
		added map[string]any
		text  string
		want  []string // pieces: added tokens as <content>, other text as its bytes' tokens decoded
	}{
		{"plain", tok("<m>"), "a <m> b", []string{"a", " ", "<m>", " ", "b"}},
		{"lstrip", tok("<m>", "lstrip"), "a  <m> b", []string{"a", "<m>", " ", "b"}},
		{"rstrip", tok("<m>", "rstrip"), "a <m>  b", []string{"a", " ", "<m>", "b"}},
		{"single word inside", tok("ab", "single_word"), "xaby", []string{"x", "a", "b", "y"}},
		{"single word alone", tok("ab", "single_word"), "x ab y", []string{"x", " ", "ab", " ", "y"}},
		{"longest wins", tok("<mm>"), "<mm>", []string{"<mm>"}},
		{"normalized", tok("e\u0301x", "normalized"), "\u00e9x", []string{"e\u0301x"}},
		{"raw not normalized", tok("e\u0301x"), "\u00e9x e\u0301x", []string{"\u00e9", "x", " ", "e\u0301x"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			added := []map[string]any{tc.added}
			if tc.name == "longest wins" {
				added = append(added, tok("<m"))
			}
			tk := mustParse(t, synthJSON(nil, false, nfc, added...))
			// Without merges each byte is a token: glue a rune's bytes back together.
			var pieces []string
			for _, id := range tk.Encode(tc.text) {
				if a, ok := tk.added[id]; ok {
					pieces = append(pieces, a.content)
				} else if n := len(pieces); n > 0 && !isAddedText(tk, pieces[n-1]) && !utf8.ValidString(pieces[n-1]) {
					pieces[n-1] = string(append([]byte(pieces[n-1]), tk.appendTokenBytes(nil, id)...))
				} else {
					pieces = append(pieces, string(tk.appendTokenBytes(nil, id)))
				}
			}
			if diff := cmp.Diff(pieces, tc.want); diff != "" {
				t.Errorf("Encode(%q) pieces (-got +want):\n%s", tc.text, diff)
			}
		})
	}
}

func isAddedText(t *Tokenizer, s string) bool {
	_, ok := t.addedText[s]
	return ok
}

func TestParseErrors(t *testing.T) {
	good := string(synthJSON(synthMerges, false, "null"))
	replace := func(old, new string) []byte {
		if !strings.Contains(good, old) {
			panic("fixture lacks " + old)
		}
		return []byte(strings.Replace(good, old, new, 1))
	}
	for _, tc := range []struct {
		name string
		data []byte
		want error
		msg  string
	}{
		{"not json", []byte(`{"model": `), ErrInvalid, "parsing JSON"},
		{"no model", []byte(`{}`), ErrInvalid, "no model"},
		{"unigram", replace(`"type":"BPE"`, `"type":"Unigram"`), ErrUnsupported, `"Unigram"`},
		{"dropout", replace(`"dropout":null`, `"dropout":0.1`), ErrUnsupported, "dropout"},
		{"normalizer", replace(`"normalizer":null`, `"normalizer":{"type":"Lowercase"}`), ErrUnsupported, `"Lowercase"`},
		{"pre-tokenizer", replace(`"pre_tokenizer":{`, `"pre_tokenizer":{"type":"Whitespace"},"x":{`), ErrUnsupported, `"Whitespace"`},
		{"no byte level", replace(`"pre_tokenizer":{`, `"pre_tokenizer":null,"x":{`), ErrUnsupported, "ByteLevel"},
		{"decoder", replace(`"decoder":{`, `"decoder":{"type":"WordPiece"},"x":{`), ErrUnsupported, `"WordPiece"`},
		{"split behavior", replace(`"pre_tokenizer":{`, `"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"a"},"behavior":"Odd"},{"type":"ByteLevel"}]},"x":{`), ErrUnsupported, `"Odd"`},
		{"bad regex", replace(`"pre_tokenizer":{`, `"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"(a"},"behavior":"Isolated"},{"type":"ByteLevel"}]},"x":{`), nil, "compiling split pattern"},
		{"merge unknown token", replace(`["l","l"]`, `["l","zz"]`), ErrInvalid, `"zz" not in vocab`},
		{"merge result unknown", replace(`"ll":256`, `"lL":256`), ErrInvalid, `merged token "ll"`},
		{"merge shape", replace(`["l","l"]`, `["l","l","l"]`), ErrInvalid, "merge 0"},
		{"legacy merge shape", replace(`["l","l"]`, `"ll"`), ErrInvalid, "merge 0"},
		{"negative id", replace(`"ll":256`, `"ll":-1`), ErrInvalid, "out of range"},
		{"huge id", replace(`"ll":256`, `"ll":99999999999`), ErrInvalid, "out of range"},
		{"duplicate id", replace(`"ll":256`, `"ll":255`), ErrInvalid, "share id"},
		{"added without id", replace(`"added_tokens":[]`, `"added_tokens":[{"content":"<x>"}]`), ErrInvalid, "added token"},
		{"added empty", replace(`"added_tokens":[]`, `"added_tokens":[{"id":5000,"content":""}]`), ErrInvalid, "empty content"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.data)
			if err == nil {
				t.Fatal("Parse succeeded, want an error")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not mention %q", err, tc.msg)
			}
		})
	}
}

func TestAppendLossy(t *testing.T) {
	// Wanted outputs are Rust's String::from_utf8_lossy (maximal subparts).
	for _, tc := range []struct{ in, want string }{
		{"abc", "abc"},
		{"\xff\xff", "\uFFFD\uFFFD"},
		{"\xe4\xb8", "\uFFFD"},
		{"\xe4\xb8A", "\uFFFDA"},
		{"\xf0\x9f\x98", "\uFFFD"},
		{"\xf0\x9f\x98\x80", "😀"},
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"},
		{"\xe0\x80", "\uFFFD\uFFFD"},
		{"\xf4\x90\x80\x80", "\uFFFD\uFFFD\uFFFD\uFFFD"},
		{"\xc0\xaf", "\uFFFD\uFFFD"},
		{"a\x80b", "a\uFFFDb"},
	} {
		if got := string(appendLossy(nil, []byte(tc.in))); got != tc.want {
			t.Errorf("appendLossy(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestDecodeBytesBeforeAddedToken(t *testing.T) {
	tk := qwen(t)
	lead := tk.mustID(t, string(byteChar[0xC3])) // first byte of "é"
	end := tk.mustID(t, "<|im_end|>")
	tail := tk.mustID(t, string(byteChar[0xA9]))
	for _, tc := range []struct {
		ids  []int
		want string
	}{
		{[]int{lead, tail}, "é"},
		{[]int{lead, end, tail}, "\uFFFD<|im_end|>\uFFFD"},
		{[]int{lead, -1, 1 << 30, tail}, "é"}, // unknown ids are skipped
	} {
		if got := tk.Decode(tc.ids); got != tc.want {
			t.Errorf("Decode(%v) = %q, want %q", tc.ids, got, tc.want)
		}
	}
}

// streamDecode feeds ids one by one and checks that every chunk is valid UTF-8.
func streamDecode(t testing.TB, tk *Tokenizer, ids []int) string {
	t.Helper()
	d := tk.NewDecoder()
	var b strings.Builder
	for _, id := range ids {
		chunk := d.Add(id)
		if !utf8.ValidString(chunk) {
			t.Fatalf("chunk %q is not valid UTF-8", chunk)
		}
		b.WriteString(chunk)
	}
	b.WriteString(d.Flush())
	return b.String()
}

func TestDecoderStreamsGoldens(t *testing.T) {
	tk := qwen(t)
	g, _ := readGolden(t, "qwen3/golden.json")
	for i, c := range g.Cases {
		if got := streamDecode(t, tk, c.IDs); got != c.Decoded {
			t.Errorf("case %d: streamed %q, want %q", i, got, c.Decoded)
		}
	}
	// Byte tokens of one emoji: nothing until the last byte arrives.
	d := tk.NewDecoder()
	var chunks []string
	for _, b := range []byte("🚀") {
		chunks = append(chunks, d.Add(tk.mustID(t, string(byteChar[b]))))
	}
	if diff := cmp.Diff(chunks, []string{"", "", "", "🚀"}); diff != "" {
		t.Errorf("chunks (-got +want):\n%s", diff)
	}
	// Ill-formed bytes come out as soon as they cannot be completed.
	ids := []int{tk.mustID(t, string(byteChar[0xE4])), tk.mustID(t, "A"), tk.mustID(t, string(byteChar[0xF0]))}
	for i, want := range []string{"", "\uFFFDA", ""} {
		if got := d.Add(ids[i]); got != want {
			t.Errorf("Add #%d = %q, want %q", i, got, want)
		}
	}
	if got := d.Flush(); got != "\uFFFD" {
		t.Errorf("Flush = %q, want U+FFFD", got)
	}
}

func TestConcurrentEncode(t *testing.T) {
	tk := qwen(t)
	g, _ := readGolden(t, "qwen3/golden.json")
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range g.Cases {
				c := g.Cases[(i+w*11)%len(g.Cases)]
				if got := tk.Encode(c.Text); !cmp.Equal(got, c.IDs) {
					errs <- fmt.Errorf("worker %d: Encode(%.30q) = %v, want %v", w, c.Text, got, c.IDs)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestSplitBehaviors(t *testing.T) {
	for _, tc := range []struct {
		behavior string
		invert   bool
		want     []string
	}{
		{"Isolated", false, []string{"the", "-", "final", "-", "-", "countdown"}},
		{"Removed", false, []string{"the", "final", "countdown"}},
		{"MergedWithPrevious", false, []string{"the-", "final-", "-", "countdown"}},
		{"MergedWithNext", false, []string{"the", "-final", "-", "-countdown"}},
		{"Contiguous", false, []string{"the", "-", "final", "--", "countdown"}},
		{"Removed", true, []string{"-", "-", "-"}},
	} {
		s := &regexSplit{literal: "-", behavior: behaviors[tc.behavior], invert: tc.invert}
		var got []string
		s.split("the-final--countdown", func(p string) { got = append(got, p) })
		if diff := cmp.Diff(got, tc.want); diff != "" {
			t.Errorf("%s invert=%v (-got +want):\n%s", tc.behavior, tc.invert, diff)
		}
	}
}

func TestInvalidUTF8Input(t *testing.T) {
	tk := mustParse(t, synthJSON(synthMerges, false, "null"))
	got := tk.Decode(tk.Encode("a\xffb"))
	if got != "a\uFFFDb" {
		t.Errorf("round trip of invalid UTF-8 = %q, want %q", got, "a\uFFFDb")
	}
}

func TestDecodeNonByteLevelEntry(t *testing.T) {
	// An entry with a rune that stands for no byte is its own UTF-8 text, as in the
	// Hugging Face ByteLevel decoder; "Ġ" stands for a space.
	tk := mustParse(t, []byte(`{"model": {"type": "BPE", "vocab": {"a": 0, "中Ġ": 1, "Ġ": 2}, "merges": []},
		"pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"}}`))
	if got, want := tk.Decode([]int{1, 0, 2, 0}), "中Ġa a"; got != want {
		t.Errorf("Decode = %q, want %q", got, want)
	}
	if got := tk.VocabSize(); got != 3 {
		t.Errorf("VocabSize() = %d, want 3", got)
	}
}

func TestDigitsPreTokenizer(t *testing.T) {
	for _, tc := range []struct {
		individual bool
		want       []string
	}{
		{true, []string{"ab", "1", "2", "3", " x", "٤", "٥"}},
		{false, []string{"ab", "123", " x", "٤٥"}},
	} {
		raw := fmt.Sprintf(`{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": %v}, {"type": "ByteLevel", "use_regex": false}]}`, tc.individual)
		steps, err := parsePreTokenizer(json.RawMessage(raw))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		steps[0].split("ab123 x٤٥", func(p string) { got = append(got, p) })
		if diff := cmp.Diff(got, tc.want); diff != "" {
			t.Errorf("individual=%v (-got +want):\n%s", tc.individual, diff)
		}
	}
}
