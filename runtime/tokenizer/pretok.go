package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/dlclark/regexp2/v2"
	"golang.org/x/text/unicode/norm"
)

// gpt2Pattern is the split regex of the ByteLevel pre-tokenizer with use_regex.
const gpt2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

// splitStep is one stage of pre-tokenization: it cuts a piece into smaller pieces.
type splitStep interface {
	split(piece string, emit func(string))
}

// behavior is how a Split pre-tokenizer treats the text its pattern matches.
type behavior int

const (
	isolated behavior = iota
	removed
	mergedWithPrevious
	mergedWithNext
	contiguous
)

var behaviors = map[string]behavior{
	"Isolated":           isolated,
	"Removed":            removed,
	"MergedWithPrevious": mergedWithPrevious,
	"MergedWithNext":     mergedWithNext,
	"Contiguous":         contiguous,
}

// regexSplit is the Split pre-tokenizer (and the regex half of ByteLevel). Patterns run in
// regexp2's default (.NET) mode: there \s, \p{L} and \p{N} are Unicode-aware and lookahead
// works, as in the Oniguruma engine Hugging Face uses; RE2 mode would make \s ASCII-only.
type regexSplit struct {
	re       *regexp2.Regexp           // nil for a literal pattern
	fast     func(s string, i int) int // hand-written matcher for re, if there is one
	literal  string
	behavior behavior
	invert   bool
}

func newRegexSplit(pattern string, b behavior, invert bool) (*regexSplit, error) {
	re, err := compileCached(pattern)
	if err != nil {
		return nil, fmt.Errorf("compiling split pattern %q: %w", pattern, err)
	}
	return &regexSplit{re: re, fast: fastSplitters[pattern], behavior: b, invert: invert}, nil
}

// compiled keeps the few distinct split patterns in use (a compiled regexp2.Regexp is
// safe for concurrent use), so loading tokenizers repeatedly does not recompile them.
var compiled struct {
	sync.Mutex
	m map[string]*regexp2.Regexp
}

func compileCached(pattern string) (*regexp2.Regexp, error) {
	compiled.Lock()
	defer compiled.Unlock()
	if re, ok := compiled.m[pattern]; ok {
		return re, nil
	}
	re, err := regexp2.Compile(pattern, regexp2.None)
	if err != nil {
		return nil, err
	}
	if compiled.m == nil || len(compiled.m) >= 16 {
		compiled.m = make(map[string]*regexp2.Regexp)
	}
	compiled.m[pattern] = re
	return re, nil
}

// span is a byte range of a piece with whether the pattern matched it.
type span struct {
	start, end int
	match      bool
}

func (s *regexSplit) spans(piece string) []span {
	var spans []span
	last := 0
	add := func(start, end int) {
		if last < start {
			spans = append(spans, span{last, start, false})
		}
		spans = append(spans, span{start, end, true})
		last = end
	}
	switch {
	case s.fast != nil:
		for i := 0; i < len(piece); {
			j := s.fast(piece, i)
			add(i, j)
			i = j
		}
	case s.re == nil:
		if s.literal != "" {
			for i := 0; ; {
				j := strings.Index(piece[i:], s.literal)
				if j < 0 {
					break
				}
				add(i+j, i+j+len(s.literal))
				i += j + len(s.literal)
			}
		}
	default:
		runes := []rune(piece)
		// byteAt[i] is the byte offset of rune i; piece is valid UTF-8 here, so each
		// rune's width is its encoded length.
		byteAt := make([]int, len(runes)+1)
		for i, r := range runes {
			byteAt[i+1] = byteAt[i] + utf8.RuneLen(r)
		}
		err := s.re.FindRunesMatches(runes, 0, func(v regexp2.MatchView) bool {
			idx, n, ok := v.GroupRange(0)
			if ok && n > 0 {
				add(byteAt[idx], byteAt[idx+n])
			}
			return true
		})
		// An error is only a backtracking-stack overflow on pathological input: the
		// unmatched rest then stays one piece, which still encodes and decodes losslessly.
		_ = err
	}
	if last < len(piece) {
		spans = append(spans, span{last, len(piece), false})
	}
	if s.invert {
		for i := range spans {
			spans[i].match = !spans[i].match
		}
	}
	return spans
}

func (s *regexSplit) split(piece string, emit func(string)) {
	if s.fast != nil && s.behavior == isolated && !s.invert {
		// The common case, without building spans: every match is a piece.
		for i := 0; i < len(piece); {
			j := s.fast(piece, i)
			emit(piece[i:j])
			i = j
		}
		return
	}
	spans := s.spans(piece)
	switch s.behavior {
	case isolated:
		for _, sp := range spans {
			emit(piece[sp.start:sp.end])
		}
	case removed:
		for _, sp := range spans {
			if !sp.match {
				emit(piece[sp.start:sp.end])
			}
		}
	case mergedWithPrevious:
		// Each match closes the piece it ends (spans alternate, so a match joins at
		// most one non-match before it; back-to-back matches stay apart).
		cut := 0
		for _, sp := range spans {
			if sp.match {
				emit(piece[cut:sp.end])
				cut = sp.end
			}
		}
		if cut < len(piece) {
			emit(piece[cut:])
		}
	case mergedWithNext:
		cut := 0
		for _, sp := range spans {
			if sp.match && sp.start > cut {
				emit(piece[cut:sp.start])
				cut = sp.start
			}
		}
		if cut < len(piece) {
			emit(piece[cut:])
		}
	case contiguous:
		// Adjacent matches fuse into one piece; non-matches stay as they are.
		cut := 0
		for i, sp := range spans {
			if sp.match && i > 0 && spans[i-1].match {
				continue
			}
			if sp.start > cut {
				emit(piece[cut:sp.start])
			}
			cut = sp.start
		}
		if cut < len(piece) {
			emit(piece[cut:])
		}
	}
}

// byteLevelStep is the ByteLevel pre-tokenizer's splitting half; the byte mapping itself
// is implicit because the BPE model works on raw bytes.
type byteLevelStep struct {
	addPrefixSpace bool
	re             *regexSplit // nil without use_regex
}

func (b *byteLevelStep) split(piece string, emit func(string)) {
	if b.addPrefixSpace && !strings.HasPrefix(piece, " ") {
		piece = " " + piece
	}
	if b.re == nil {
		emit(piece)
		return
	}
	b.re.split(piece, emit)
}

// preTokenizerJSON is any pre-tokenizer object of tokenizer.json; fields unused by a
// type stay zero.
type preTokenizerJSON struct {
	Type           string            `json:"type"`
	Pretokenizers  []json.RawMessage `json:"pretokenizers"`
	Pattern        *patternJSON      `json:"pattern"`
	Behavior       string            `json:"behavior"`
	Invert         bool              `json:"invert"`
	AddPrefixSpace bool              `json:"add_prefix_space"`
	UseRegex       *bool             `json:"use_regex"`
	Individual     bool              `json:"individual_digits"`
}

type patternJSON struct {
	Regex  *string `json:"Regex"`
	String *string `json:"String"`
}

// parsePreTokenizer turns the pre_tokenizer of tokenizer.json into split steps. The
// vocabulary is byte-level, so exactly one ByteLevel must come last: splits after the
// byte mapping would see its stand-in characters, which this model does not reproduce.
func parsePreTokenizer(raw json.RawMessage) ([]splitStep, error) {
	if isNull(raw) {
		return nil, fmt.Errorf("pre_tokenizer is null: %w (a byte-level BPE needs a ByteLevel pre-tokenizer)", ErrUnsupported)
	}
	var steps []splitStep
	if err := appendPreTokenizer(raw, &steps, 0); err != nil {
		return nil, err
	}
	var byteLevels int
	for _, s := range steps {
		if _, ok := s.(*byteLevelStep); ok {
			byteLevels++
		}
	}
	if byteLevels != 1 {
		return nil, fmt.Errorf("pre_tokenizer has %d ByteLevel steps: %w (want exactly one)", byteLevels, ErrUnsupported)
	}
	if _, ok := steps[len(steps)-1].(*byteLevelStep); !ok {
		return nil, fmt.Errorf("pre_tokenizer: %w: ByteLevel must be the last step", ErrUnsupported)
	}
	return steps, nil
}

func appendPreTokenizer(raw json.RawMessage, steps *[]splitStep, depth int) error {
	if depth > 8 {
		return fmt.Errorf("pre_tokenizer: Sequence nested too deep")
	}
	var p preTokenizerJSON
	if err := json.Unmarshal(raw, &p); err != nil {
		return fmt.Errorf("parsing pre_tokenizer: %w", err)
	}
	switch p.Type {
	case "Sequence":
		for _, sub := range p.Pretokenizers {
			if err := appendPreTokenizer(sub, steps, depth+1); err != nil {
				return err
			}
		}
	case "ByteLevel":
		step := &byteLevelStep{addPrefixSpace: p.AddPrefixSpace}
		if p.UseRegex == nil || *p.UseRegex { // Hugging Face defaults use_regex to true
			re, err := newRegexSplit(gpt2Pattern, isolated, false)
			if err != nil {
				return err
			}
			step.re = re
		}
		*steps = append(*steps, step)
	case "Digits":
		// Rust's char::is_numeric is the N category, as \p{N} is: individual digits
		// are isolated one by one, else runs of them.
		pattern := `\p{N}+`
		if p.Individual {
			pattern = `\p{N}`
		}
		s, err := newRegexSplit(pattern, isolated, false)
		if err != nil {
			return err
		}
		*steps = append(*steps, s)
	case "Split":
		b, ok := behaviors[p.Behavior]
		if !ok {
			return fmt.Errorf("pre_tokenizer Split: behavior %q: %w", p.Behavior, ErrUnsupported)
		}
		if p.Pattern == nil {
			return fmt.Errorf("pre_tokenizer Split: no pattern")
		}
		var s *regexSplit
		switch {
		case p.Pattern.Regex != nil:
			var err error
			if s, err = newRegexSplit(*p.Pattern.Regex, b, p.Invert); err != nil {
				return fmt.Errorf("pre_tokenizer Split: %w", err)
			}
		case p.Pattern.String != nil:
			s = &regexSplit{literal: *p.Pattern.String, behavior: b, invert: p.Invert}
		default:
			return fmt.Errorf("pre_tokenizer Split: pattern has neither Regex nor String")
		}
		*steps = append(*steps, s)
	default:
		return fmt.Errorf("pre_tokenizer type %q: %w", p.Type, ErrUnsupported)
	}
	return nil
}

// normalizerJSON is a normalizer object of tokenizer.json.
type normalizerJSON struct {
	Type        string            `json:"type"`
	Normalizers []json.RawMessage `json:"normalizers"`
}

// parseNormalizer returns the normalization forms to apply in order (none for null).
func parseNormalizer(raw json.RawMessage, depth int) ([]norm.Form, error) {
	if isNull(raw) {
		return nil, nil
	}
	if depth > 8 {
		return nil, fmt.Errorf("normalizer: Sequence nested too deep")
	}
	var n normalizerJSON
	if err := json.Unmarshal(raw, &n); err != nil {
		return nil, fmt.Errorf("parsing normalizer: %w", err)
	}
	switch n.Type {
	case "NFC":
		return []norm.Form{norm.NFC}, nil
	case "NFD":
		return []norm.Form{norm.NFD}, nil
	case "NFKC":
		return []norm.Form{norm.NFKC}, nil
	case "NFKD":
		return []norm.Form{norm.NFKD}, nil
	case "Sequence":
		var forms []norm.Form
		for _, sub := range n.Normalizers {
			f, err := parseNormalizer(sub, depth+1)
			if err != nil {
				return nil, err
			}
			forms = append(forms, f...)
		}
		return forms, nil
	}
	return nil, fmt.Errorf("normalizer type %q: %w", n.Type, ErrUnsupported)
}

func isNull(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}

// isWordChar is Rust's char::is_alphanumeric or '_', which single_word added tokens use.
func isWordChar(r rune) bool {
	return r == '_' || unicode.IsLetter(r) || unicode.IsNumber(r)
}
