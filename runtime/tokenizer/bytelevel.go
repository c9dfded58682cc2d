package tokenizer

import "unicode/utf8"

// byteChar maps each byte to the printable rune GPT-2's byte-level BPE writes it as
// (bytes_to_unicode): printable Latin-1 bytes stand for themselves, the other 68 are
// shifted to U+0100.. so that no vocabulary entry holds whitespace or control characters.
var byteChar [256]rune

// charByte is the inverse of byteChar, indexed by rune; -1 where a rune is not a byte's
// stand-in. Every stand-in is below U+0144.
var charByte [0x144]int16

func init() {
	for i := range charByte {
		charByte[i] = -1
	}
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteChar[b] = rune(b)
		} else {
			byteChar[b] = rune(256 + n)
			n++
		}
		charByte[byteChar[b]] = int16(b)
	}
}

// appendVocabBytes appends the bytes a byte-level vocabulary entry stands for. Like the
// Hugging Face ByteLevel decoder, an entry holding any rune that is not a byte's stand-in
// is taken as its own UTF-8 text.
func appendVocabBytes(dst []byte, tok string) []byte {
	if !isByteLevel(tok) {
		return append(dst, tok...)
	}
	for _, r := range tok {
		dst = append(dst, byte(charByte[r]))
	}
	return dst
}

// tokenByteLen is len(appendVocabBytes(nil, tok)) without building it.
func tokenByteLen(tok string) int {
	if !isByteLevel(tok) {
		return len(tok)
	}
	return utf8.RuneCountInString(tok)
}

func isByteLevel(tok string) bool {
	for _, r := range tok {
		if r >= rune(len(charByte)) || charByte[r] < 0 {
			return false
		}
	}
	return true
}

// appendLossy appends b to dst as valid UTF-8, replacing each maximal ill-formed
// subsequence by one U+FFFD — the Unicode "substitution of maximal subparts" that Rust's
// String::from_utf8_lossy (and so Hugging Face decoding) uses. Go's strings.ToValidUTF8
// would instead collapse whole runs, and a per-byte loop would over-count truncated runes.
func appendLossy(dst, b []byte) []byte {
	for len(b) > 0 {
		if b[0] < utf8.RuneSelf {
			dst = append(dst, b[0])
			b = b[1:]
			continue
		}
		r, size := utf8.DecodeRune(b)
		if r != utf8.RuneError || size > 1 {
			dst = append(dst, b[:size]...)
			b = b[size:]
			continue
		}
		n := invalidPrefix(b)
		dst = append(dst, "\uFFFD"...)
		b = b[n:]
	}
	return dst
}

// invalidPrefix returns the length of the maximal subpart at the start of b, which does
// not begin with a valid rune: the lead byte plus the continuation bytes that could still
// have completed it (at least 1).
func invalidPrefix(b []byte) int {
	need, lo, hi := seqShape(b[0])
	if need == 0 {
		return 1
	}
	n := 1
	for n <= need && n < len(b) {
		c := b[n]
		if n == 1 {
			if c < lo || c > hi {
				break
			}
		} else if c < 0x80 || c > 0xBF {
			break
		}
		n++
	}
	return n
}

// seqShape tells, for a lead byte, how many continuation bytes follow it and the range of
// the first one (narrower than 80..BF for E0, ED, F0 and F4); need is 0 for a byte that
// cannot start a rune.
func seqShape(lead byte) (need int, lo, hi byte) {
	switch {
	case lead >= 0xC2 && lead <= 0xDF:
		return 1, 0x80, 0xBF
	case lead == 0xE0:
		return 2, 0xA0, 0xBF
	case lead == 0xED:
		return 2, 0x80, 0x9F
	case lead >= 0xE1 && lead <= 0xEF:
		return 2, 0x80, 0xBF
	case lead == 0xF0:
		return 3, 0x90, 0xBF
	case lead == 0xF4:
		return 3, 0x80, 0x8F
	case lead >= 0xF1 && lead <= 0xF3:
		return 3, 0x80, 0xBF
	}
	return 0, 0, 0
}

// completePrefix returns how many leading bytes of b can be written out now: whole runes,
// and ill-formed subsequences (as U+FFFD) that no later byte can complete. What remains is
// the start of a rune still waiting for its continuation bytes.
func completePrefix(b []byte) int {
	i := 0
	for i < len(b) {
		if b[i] < utf8.RuneSelf {
			i++
			continue
		}
		if utf8.FullRune(b[i:]) {
			_, size := utf8.DecodeRune(b[i:])
			i += size
			continue
		}
		// Not a full rune yet: either a valid but truncated prefix (wait for more) or an
		// ill-formed one (write it out now). A lead byte never continues an earlier
		// subsequence, so stopping before one cannot split a U+FFFD in two.
		if !validPrefix(b[i:]) {
			i += invalidPrefix(b[i:])
			continue
		}
		return i
	}
	return i
}

// validPrefix reports whether b (shorter than its lead byte's rune) could still be
// completed into a valid rune.
func validPrefix(b []byte) bool {
	need, lo, hi := seqShape(b[0])
	if need == 0 || len(b) > need {
		return false
	}
	for j := 1; j < len(b); j++ {
		c := b[j]
		if j == 1 && (c < lo || c > hi) {
			return false
		}
		if c < 0x80 || c > 0xBF {
			return false
		}
	}
	return true
}
