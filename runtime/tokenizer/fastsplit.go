package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// qwenPattern is the split regex of Qwen2/Qwen3 (and kin) tokenizers.
const qwenPattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`

// fastSplitters are hand-written matchers for the two pre-tokenizer patterns nearly
// every byte-level BPE uses. They cut text exactly where the regexp2 engine does
// (FuzzFastSplit checks this against regexp2) at several times its speed. Both patterns
// match every character, so a piece is the concatenation of its matches.
var fastSplitters = map[string]func(s string, i int) int{
	gpt2Pattern: gpt2Match,
	qwenPattern: qwenMatch,
}

// Character classes of the patterns, as regexp2 defines them (\s is Unicode White_Space).
func isL(r rune) bool     { return unicode.IsLetter(r) }
func isN(r rune) bool     { return unicode.IsNumber(r) }
func isS(r rune) bool     { return unicode.IsSpace(r) }
func isOther(r rune) bool { return !isS(r) && !isL(r) && !isN(r) }
func isCRLF(r rune) bool  { return r == '\r' || r == '\n' }

// at decodes the rune at byte i of s; size 0 at the end.
func at(s string, i int) (rune, int) {
	if i >= len(s) {
		return -1, 0
	}
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), 1
	}
	return utf8.DecodeRuneInString(s[i:])
}

// run returns the end of the run of runes satisfying f that starts at i.
func run(s string, i int, f func(rune) bool) int {
	for {
		r, n := at(s, i)
		if n == 0 || !f(r) {
			return i
		}
		i += n
	}
}

// contraction returns the end of 's 't 're 've 'm 'll 'd at i, or -1. With fold, letters
// match case-insensitively under Unicode simple folding (so "'ſ" is "'s"), as (?i) does.
func contraction(s string, i int, fold bool) int {
	if i >= len(s) || s[i] != '\'' {
		return -1
	}
	for _, suffix := range [...]string{"s", "t", "re", "ve", "m", "ll", "d"} {
		j := i + 1
		ok := true
		for k := 0; k < len(suffix); k++ {
			r, n := at(s, j)
			if n == 0 || !(rune(suffix[k]) == r || fold && foldEq(rune(suffix[k]), r)) {
				ok = false
				break
			}
			j += n
		}
		if ok {
			return j
		}
	}
	return -1
}

// foldEq reports whether r is in c's simple case-folding orbit.
func foldEq(c, r rune) bool {
	for f := unicode.SimpleFold(c); f != c; f = unicode.SimpleFold(f) {
		if f == r {
			return true
		}
	}
	return false
}

// spaceTail matches \s+(?!\S)|\s+ at i (a whitespace rune): the whole whitespace run
// when it ends the text, else the run less its last rune (which the next word takes),
// unless that leaves nothing.
func spaceTail(s string, i int) int {
	end := run(s, i, isS)
	if end == len(s) {
		return end
	}
	_, last := utf8.DecodeLastRuneInString(s[:end])
	if end-last > i {
		return end - last
	}
	return end
}

// gpt2Match returns the end of the match of gpt2Pattern at byte i (< len(s)).
func gpt2Match(s string, i int) int {
	if j := contraction(s, i, false); j >= 0 {
		return j
	}
	r, n := at(s, i)
	start := i
	if r == ' ' {
		if r2, n2 := at(s, i+n); n2 > 0 {
			// " ?" is taken only when the class run can follow it.
			switch {
			case isL(r2):
				return run(s, i+n, isL)
			case isN(r2):
				return run(s, i+n, isN)
			case isOther(r2):
				return run(s, i+n, isOther)
			}
		}
	}
	switch {
	case isL(r):
		return run(s, start, isL)
	case isN(r):
		return run(s, start, isN)
	case isOther(r):
		return run(s, start, isOther)
	}
	return spaceTail(s, i)
}

// qwenMatch returns the end of the match of qwenPattern at byte i (< len(s)).
func qwenMatch(s string, i int) int {
	if j := contraction(s, i, true); j >= 0 {
		return j
	}
	r, n := at(s, i)
	// [^\r\n\p{L}\p{N}]?\p{L}+
	if !isCRLF(r) && !isL(r) && !isN(r) {
		if r2, _ := at(s, i+n); isL(r2) {
			return run(s, i+n, isL)
		}
	}
	if isL(r) {
		return run(s, i, isL)
	}
	// \p{N}
	if isN(r) {
		return i + n
	}
	//  ?[^\s\p{L}\p{N}]+[\r\n]*
	if r == ' ' {
		if r2, _ := at(s, i+n); isOther(r2) {
			return run(s, run(s, i+n, isOther), isCRLF)
		}
	}
	if isOther(r) {
		return run(s, run(s, i, isOther), isCRLF)
	}
	// \s*[\r\n]+: up to and including the last CR or LF of the whitespace run.
	end := run(s, i, isS)
	for j := end; j > i; {
		r, n := utf8.DecodeLastRuneInString(s[i:j])
		if isCRLF(r) {
			return j
		}
		j -= n
	}
	return spaceTail(s, i)
}
