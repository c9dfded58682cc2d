package tokenizer

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// addedToken is an entry of tokenizer.json's added_tokens.
type addedToken struct {
	id         int
	content    string
	pattern    string // content, normalized when the token matches normalized text
	special    bool
	singleWord bool // matches only when not inside a word
	lstrip     bool // swallows the whitespace before it
	rstrip     bool // swallows the whitespace after it
	normalized bool // matches the normalized text rather than the raw input
}

// addedMatcher finds added tokens leftmost-longest, like the Aho-Corasick automaton of
// Hugging Face tokenizers. Added tokens are few (tens), so an index by first byte with
// candidates longest-first is as fast and much simpler.
type addedMatcher struct {
	byFirst [256][]*addedToken
	any     bool
}

func newAddedMatcher(tokens []*addedToken) *addedMatcher {
	m := &addedMatcher{}
	for _, t := range tokens {
		if t.pattern == "" {
			continue
		}
		c := t.pattern[0]
		m.byFirst[c] = append(m.byFirst[c], t)
		m.any = true
	}
	for c := range m.byFirst {
		l := m.byFirst[c]
		// Longest first; among equals, the one listed first wins, as Aho-Corasick's
		// pattern order does.
		for i := 1; i < len(l); i++ {
			for j := i; j > 0 && len(l[j].pattern) > len(l[j-1].pattern); j-- {
				l[j], l[j-1] = l[j-1], l[j]
			}
		}
	}
	return m
}

// split calls emit for each segment of text in order: runs of ordinary text with tok nil,
// and added tokens with their token. It follows AddedVocabulary::find_matches: a match
// rejected by single_word is skipped (not retried shorter), lstrip/rstrip widen the
// match over adjacent whitespace.
func (m *addedMatcher) split(text string, emit func(seg string, tok *addedToken)) {
	if !m.any {
		if text != "" {
			emit(text, nil)
		}
		return
	}
	done := 0 // end of what has been emitted
	for i := 0; i < len(text); {
		tok := m.longestAt(text, i)
		if tok == nil {
			i++
			continue
		}
		start, stop := i, i+len(tok.pattern)
		i = stop
		if start < done {
			continue // inside whitespace an earlier rstrip swallowed
		}
		if tok.singleWord && (endsWithWord(text[:start]) || startsWithWord(text[stop:])) {
			continue
		}
		if tok.lstrip {
			start = max(len(strings.TrimRightFunc(text[:start], unicode.IsSpace)), done)
		}
		if tok.rstrip {
			stop = len(text) - len(strings.TrimLeftFunc(text[stop:], unicode.IsSpace))
			i = stop
		}
		if done < start {
			emit(text[done:start], nil)
		}
		emit(text[start:stop], tok)
		done = stop
	}
	if done < len(text) {
		emit(text[done:], nil)
	}
}

func (m *addedMatcher) longestAt(text string, i int) *addedToken {
	for _, t := range m.byFirst[text[i]] {
		if strings.HasPrefix(text[i:], t.pattern) {
			return t
		}
	}
	return nil
}

func endsWithWord(s string) bool {
	r, n := utf8.DecodeLastRuneInString(s)
	return n > 0 && isWordChar(r)
}

func startsWithWord(s string) bool {
	r, n := utf8.DecodeRuneInString(s)
	return n > 0 && isWordChar(r)
}
