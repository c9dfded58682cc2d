// Package tokenizer reads Hugging Face tokenizer.json files for byte-level BPE models
// (GPT-2, Qwen, Ouro and kin) and encodes and decodes text exactly as the Hugging Face
// tokenizers library does: added and special tokens are split out first, the rest is
// normalized, pre-tokenized by regex, byte-mapped and merged by rank. It also renders
// ChatML chat templates and decodes token streams incrementally for servers.
package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

var (
	// ErrUnsupported marks a tokenizer.json that uses a model, normalizer,
	// pre-tokenizer, decoder or option this package does not implement.
	ErrUnsupported = errors.New("unsupported tokenizer feature")
	// ErrInvalid marks a malformed tokenizer.json: bad JSON, merges naming unknown
	// tokens, ids out of range.
	ErrInvalid = errors.New("invalid tokenizer")
)

// maxID bounds token ids: ids index dense tables, so a stray huge id in a file must not
// allocate gigabytes. The largest public vocabularies are about 262k.
const maxID = 1<<21 - 1

// Tokenizer encodes text to token ids and back. Create one with Load or LoadDir; the zero
// value is not usable. A Tokenizer is safe for concurrent use: after loading, it is only
// read, except for its internal word cache, which locks.
type Tokenizer struct {
	model *bpe
	forms []norm.Form // normalizer, applied in order

	steps []splitStep // pre-tokenizer

	rawAdded  *addedMatcher // added tokens matched on the raw input
	normAdded *addedMatcher // added tokens matched after normalization
	added     map[int]*addedToken
	addedText map[string]int

	// Decoding table: the bytes of model token id are tokBytes[tokOff[id]:tokOff[id+1]].
	tokBytes []byte
	tokOff   []uint32 // [vocabSize+1]
	isToken  []bool   // [vocabSize]: id names a model token

	vocabSize int

	// From tokenizer_config.json (LoadDir); -1 when absent.
	bos, eos, pad int
	chat          *chatTemplate
	chatErr       error // why the config's chat template cannot be rendered
}

// fileJSON is the part of tokenizer.json this package reads. post_processor is ignored:
// Encode adds no special tokens, and that is all a post-processor does to ids.
type fileJSON struct {
	AddedTokens  []addedTokenJSON `json:"added_tokens"`
	Normalizer   json.RawMessage  `json:"normalizer"`
	PreTokenizer json.RawMessage  `json:"pre_tokenizer"`
	Decoder      json.RawMessage  `json:"decoder"`
	Model        *modelJSON       `json:"model"`
}

type addedTokenJSON struct {
	ID         *int   `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type modelJSON struct {
	Type                    string         `json:"type"`
	Dropout                 *float64       `json:"dropout"`
	UnkToken                *string        `json:"unk_token"`
	ContinuingSubwordPrefix *string        `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string        `json:"end_of_word_suffix"`
	ByteFallback            bool           `json:"byte_fallback"`
	IgnoreMerges            bool           `json:"ignore_merges"`
	Vocab                   map[string]int `json:"vocab"`
	Merges                  []any          `json:"merges"`
}

type decoderJSON struct {
	Type string `json:"type"`
}

// Load reads a tokenizer.json file.
func Load(path string) (*Tokenizer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading tokenizer: %w", err)
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("loading tokenizer %s: %w", path, err)
	}
	return t, nil
}

// Parse builds a Tokenizer from the contents of a tokenizer.json file.
func Parse(data []byte) (*Tokenizer, error) {
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: parsing JSON: %w", ErrInvalid, err)
	}
	if f.Model == nil {
		return nil, fmt.Errorf("%w: no model", ErrInvalid)
	}
	t := &Tokenizer{bos: -1, eos: -1, pad: -1}
	var err error
	if t.forms, err = parseNormalizer(f.Normalizer, 0); err != nil {
		return nil, err
	}
	if t.steps, err = parsePreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	if err := checkDecoder(f.Decoder); err != nil {
		return nil, err
	}
	if t.model, err = parseModel(f.Model); err != nil {
		return nil, err
	}
	if err := t.buildTables(f.Model.Vocab, f.AddedTokens); err != nil {
		return nil, err
	}
	return t, nil
}

func checkDecoder(raw json.RawMessage) error {
	if isNull(raw) {
		return fmt.Errorf("decoder is null: %w (a byte-level BPE needs the ByteLevel decoder)", ErrUnsupported)
	}
	var d decoderJSON
	if err := json.Unmarshal(raw, &d); err != nil {
		return fmt.Errorf("%w: parsing decoder: %w", ErrInvalid, err)
	}
	if d.Type != "ByteLevel" {
		return fmt.Errorf("decoder type %q: %w", d.Type, ErrUnsupported)
	}
	return nil
}

func parseModel(mj *modelJSON) (*bpe, error) {
	if mj.Type != "BPE" && mj.Type != "" { // Hugging Face infers BPE from merges when type is absent
		return nil, fmt.Errorf("model type %q: %w", mj.Type, ErrUnsupported)
	}
	switch {
	case mj.Dropout != nil && *mj.Dropout != 0:
		return nil, fmt.Errorf("BPE dropout %g: %w", *mj.Dropout, ErrUnsupported)
	case mj.ContinuingSubwordPrefix != nil && *mj.ContinuingSubwordPrefix != "":
		return nil, fmt.Errorf("BPE continuing_subword_prefix %q: %w", *mj.ContinuingSubwordPrefix, ErrUnsupported)
	case mj.EndOfWordSuffix != nil && *mj.EndOfWordSuffix != "":
		return nil, fmt.Errorf("BPE end_of_word_suffix %q: %w", *mj.EndOfWordSuffix, ErrUnsupported)
	case mj.ByteFallback:
		return nil, fmt.Errorf("BPE byte_fallback: %w", ErrUnsupported)
	}
	if len(mj.Vocab) == 0 {
		return nil, fmt.Errorf("%w: empty vocab", ErrInvalid)
	}
	m := &bpe{
		vocab:        mj.Vocab,
		unk:          -1,
		ignoreMerges: mj.IgnoreMerges,
		merges:       make(map[uint64]merge, len(mj.Merges)),
		cache:        newWordCache(),
	}
	for tok, id := range mj.Vocab {
		if id < 0 || id > maxID {
			return nil, fmt.Errorf("%w: vocab id %d of %q out of range [0, %d]", ErrInvalid, id, tok, maxID)
		}
	}
	if mj.UnkToken != nil {
		id, ok := mj.Vocab[*mj.UnkToken]
		if !ok {
			return nil, fmt.Errorf("%w: unk_token %q not in vocab", ErrInvalid, *mj.UnkToken)
		}
		m.unk = int32(id)
	}
	for b := range 256 {
		id, ok := mj.Vocab[string(byteChar[b])]
		if !ok {
			m.byteID[b] = -1
			continue
		}
		m.byteID[b] = int32(id)
	}
	for rank, raw := range mj.Merges {
		a, b, err := mergePair(raw)
		if err != nil {
			return nil, fmt.Errorf("%w: merge %d: %w", ErrInvalid, rank, err)
		}
		ida, oka := mj.Vocab[a]
		idb, okb := mj.Vocab[b]
		idn, okn := mj.Vocab[a+b]
		switch {
		case !oka:
			return nil, fmt.Errorf("%w: merge %d: token %q not in vocab", ErrInvalid, rank, a)
		case !okb:
			return nil, fmt.Errorf("%w: merge %d: token %q not in vocab", ErrInvalid, rank, b)
		case !okn:
			return nil, fmt.Errorf("%w: merge %d: merged token %q not in vocab", ErrInvalid, rank, a+b)
		}
		k := pairKey(int32(ida), int32(idb))
		if _, dup := m.merges[k]; dup {
			continue // the first (lowest) rank of a repeated merge is the one that applies
		}
		m.merges[k] = merge{rank: int32(rank), newID: int32(idn)}
	}
	return m, nil
}

// mergePair reads one merge in either encoding: "a b" or ["a", "b"].
func mergePair(raw any) (string, string, error) {
	switch v := raw.(type) {
	case string:
		a, b, ok := strings.Cut(v, " ")
		if !ok || a == "" || b == "" || strings.Contains(b, " ") {
			return "", "", fmt.Errorf("%q is not two tokens separated by a space", v)
		}
		return a, b, nil
	case []any:
		if len(v) == 2 {
			a, oka := v[0].(string)
			b, okb := v[1].(string)
			if oka && okb {
				return a, b, nil
			}
		}
	}
	return "", "", fmt.Errorf("%v is neither \"a b\" nor [\"a\", \"b\"]", raw)
}

func (t *Tokenizer) buildTables(vocab map[string]int, addedJSON []addedTokenJSON) error {
	size := 0
	for _, id := range vocab {
		size = max(size, id+1)
	}
	t.added = make(map[int]*addedToken, len(addedJSON))
	t.addedText = make(map[string]int, len(addedJSON))
	var raw, normed []*addedToken
	for i, a := range addedJSON {
		if a.ID == nil || *a.ID < 0 || *a.ID > maxID {
			return fmt.Errorf("%w: added token %d (%q): missing or out-of-range id", ErrInvalid, i, a.Content)
		}
		if a.Content == "" {
			return fmt.Errorf("%w: added token %d has empty content", ErrInvalid, *a.ID)
		}
		tok := &addedToken{
			id: *a.ID, content: a.Content, pattern: a.Content, special: a.Special,
			singleWord: a.SingleWord, lstrip: a.LStrip, rstrip: a.RStrip, normalized: a.Normalized,
		}
		if prev, dup := t.added[tok.id]; dup {
			return fmt.Errorf("%w: added tokens %q and %q share id %d", ErrInvalid, prev.content, tok.content, tok.id)
		}
		t.added[tok.id] = tok
		if _, dup := t.addedText[tok.content]; !dup {
			t.addedText[tok.content] = tok.id
		}
		size = max(size, tok.id+1)
		if tok.normalized && len(t.forms) > 0 {
			tok.pattern = t.normalize(tok.content)
			normed = append(normed, tok)
		} else {
			raw = append(raw, tok)
		}
	}
	t.rawAdded = newAddedMatcher(raw)
	t.normAdded = newAddedMatcher(normed)
	t.vocabSize = size

	// Two passes over the vocabulary lay every token's bytes out in id order without
	// an id-indexed table of strings: first the lengths, then the bytes.
	t.isToken = make([]bool, size)
	t.tokOff = make([]uint32, size+1)
	for tok, id := range vocab {
		if t.isToken[id] {
			return fmt.Errorf("%w: vocab tokens share id %d (one is %q)", ErrInvalid, id, tok)
		}
		t.isToken[id] = true
		t.tokOff[id+1] = uint32(tokenByteLen(tok))
	}
	for id := range size {
		t.tokOff[id+1] += t.tokOff[id]
	}
	t.tokBytes = make([]byte, t.tokOff[size])
	for tok, id := range vocab {
		appendVocabBytes(t.tokBytes[t.tokOff[id]:t.tokOff[id]], tok)
	}
	return nil
}

func (t *Tokenizer) normalize(s string) string {
	for _, f := range t.forms {
		s = f.String(s)
	}
	return s
}

// VocabSize returns one more than the largest token id, counting added tokens: the number
// of rows an embedding table for this tokenizer needs.
func (t *Tokenizer) VocabSize() int { return t.vocabSize }

// TokenID returns the id of a token given by its text: an added token's content, or a
// model vocabulary entry in its byte-level spelling (e.g. "Ġthe").
func (t *Tokenizer) TokenID(s string) (int, bool) {
	if id, ok := t.addedText[s]; ok {
		return id, true
	}
	id, ok := t.model.vocab[s]
	return id, ok
}

// IsSpecial reports whether id is an added token marked special (e.g. <|im_end|>).
func (t *Tokenizer) IsSpecial(id int) bool {
	a, ok := t.added[id]
	return ok && a.special
}

// Encode returns the token ids of text, without adding BOS or any other special token.
// Added and special tokens written in the text (e.g. "<|im_start|>") become their ids.
// Text that is not valid UTF-8 is encoded with each bad byte read as U+FFFD.
func (t *Tokenizer) Encode(text string) []int {
	if !utf8.ValidString(text) {
		text = string([]rune(text))
	}
	ids := make([]int, 0, len(text)/3+1)
	t.rawAdded.split(text, func(seg string, tok *addedToken) {
		if tok != nil {
			ids = append(ids, tok.id)
			return
		}
		seg = t.normalize(seg)
		t.normAdded.split(seg, func(seg string, tok *addedToken) {
			if tok != nil {
				ids = append(ids, tok.id)
				return
			}
			ids = t.encodePlain(seg, ids)
		})
	})
	return ids
}

// encodePlain pre-tokenizes normalized text free of added tokens and runs BPE per piece.
// The chain of steps is built once per call, not once per piece.
func (t *Tokenizer) encodePlain(text string, ids []int) []int {
	next := func(piece string) {
		if piece != "" {
			ids = t.model.encode(piece, ids)
		}
	}
	for k := len(t.steps) - 1; k >= 0; k-- {
		step, after := t.steps[k], next
		next = func(piece string) {
			if piece != "" {
				step.split(piece, after)
			}
		}
	}
	next(text)
	return ids
}

// Decode returns the text of ids, keeping special tokens' text. Model tokens are turned
// back into bytes, and each run of them between added tokens is made valid UTF-8 with
// U+FFFD for ill-formed bytes, as Hugging Face decode does. Unknown ids are skipped.
func (t *Tokenizer) Decode(ids []int) string {
	out := make([]byte, 0, len(ids)*4)
	var run []byte // model-token bytes since the last added token
	for _, id := range ids {
		if a, ok := t.added[id]; ok {
			out = appendLossy(out, run)
			run = run[:0]
			out = append(out, a.content...)
			continue
		}
		run = t.appendTokenBytes(run, id)
	}
	out = appendLossy(out, run)
	return string(out)
}

// TokenBytes returns the bytes of one token: a model token's bytes (possibly part of a UTF-8
// character), an added token's content, nothing for an unknown id.
func (t *Tokenizer) TokenBytes(id int) []byte {
	if a, ok := t.added[id]; ok {
		return []byte(a.content)
	}
	return t.appendTokenBytes(nil, id)
}

// appendTokenBytes appends the bytes of model token id (nothing for an unknown id).
func (t *Tokenizer) appendTokenBytes(dst []byte, id int) []byte {
	if id < 0 || id >= len(t.isToken) || !t.isToken[id] {
		return dst
	}
	return append(dst, t.tokBytes[t.tokOff[id]:t.tokOff[id+1]]...)
}
