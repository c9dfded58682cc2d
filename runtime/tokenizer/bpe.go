package tokenizer

import (
	"strings"
	"sync"
	"sync/atomic"
)

// merge is one BPE rule: the pair it applies to is its key in bpe.merges.
type merge struct {
	rank  int32 // lower merges first
	newID int32 // id of the concatenated token
}

// pairKey packs two token ids into a map key so that rank look-ups never build strings.
func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// bpe is a byte-level BPE model: a word's bytes start as one symbol each and are merged
// by rank, lowest first (leftmost on ties), as in Hugging Face tokenizers.
type bpe struct {
	byteID       [256]int32 // id of each byte's stand-in character; -1 if not in the vocabulary
	merges       map[uint64]merge
	unk          int32 // id for a byte missing from the vocabulary; -1 drops it
	ignoreMerges bool  // a word that is itself in the vocabulary is taken whole
	vocab        map[string]int
	cache        *wordCache
}

// maxCachedWord is the longest word (in bytes) whose encoding is cached; longer ones are
// rare and would crowd the cache. Hugging Face uses the same bound.
const maxCachedWord = 256

// encode appends the ids of one pre-tokenized word (raw bytes, not yet byte-mapped).
func (m *bpe) encode(word string, out []int) []int {
	if len(word) == 0 {
		return out
	}
	if m.ignoreMerges {
		if id, ok := m.vocab[mapBytes(word)]; ok {
			return append(out, id)
		}
	}
	if len(word) < maxCachedWord {
		if ids, ok := m.cache.get(word); ok {
			return appendIDs(out, ids)
		}
	}
	ids := m.merge(word)
	if len(word) < maxCachedWord {
		m.cache.put(word, ids)
	}
	return appendIDs(out, ids)
}

func appendIDs(out []int, ids []int32) []int {
	for _, id := range ids {
		out = append(out, int(id))
	}
	return out
}

// mapBytes returns the byte-level spelling of raw bytes (what the vocabulary holds).
func mapBytes(s string) string {
	rs := make([]rune, len(s))
	for i := 0; i < len(s); i++ {
		rs[i] = byteChar[s[i]]
	}
	return string(rs)
}

// symbol is a node of the doubly linked list of a word's current tokens.
type symbol struct {
	id         int32
	prev, next int32 // indexes into the symbol slice; -1 at the ends
	gone       bool  // merged into its left neighbour
}

// candidate is a merge that may apply at symbol pos; stale candidates are skipped when
// popped, as in the Hugging Face implementation.
type candidate struct {
	rank, pos, newID int32
}

func (c candidate) less(o candidate) bool {
	return c.rank < o.rank || (c.rank == o.rank && c.pos < o.pos)
}

// merge runs BPE on one word. It is O(n log n) in the word's length, so long runs of one
// character (which the pre-tokenizer can produce) stay cheap.
func (m *bpe) merge(word string) []int32 {
	syms := make([]symbol, 0, len(word))
	for i := 0; i < len(word); i++ {
		id := m.byteID[word[i]]
		if id < 0 {
			if m.unk < 0 {
				continue
			}
			id = m.unk
		}
		syms = append(syms, symbol{id: id, prev: int32(len(syms)) - 1, next: int32(len(syms)) + 1})
	}
	if len(syms) == 0 {
		return nil
	}
	syms[len(syms)-1].next = -1
	var h candHeap
	for i := 0; i+1 < len(syms); i++ {
		if mg, ok := m.merges[pairKey(syms[i].id, syms[i+1].id)]; ok {
			h.push(candidate{mg.rank, int32(i), mg.newID})
		}
	}
	for len(h) > 0 {
		c := h.pop()
		s := &syms[c.pos]
		if s.gone || s.next < 0 {
			continue
		}
		right := &syms[s.next]
		if mg, ok := m.merges[pairKey(s.id, right.id)]; !ok || mg.newID != c.newID {
			continue
		}
		s.id = c.newID
		right.gone = true
		s.next = right.next
		if s.next >= 0 {
			syms[s.next].prev = c.pos
		}
		if s.prev >= 0 {
			if mg, ok := m.merges[pairKey(syms[s.prev].id, s.id)]; ok {
				h.push(candidate{mg.rank, s.prev, mg.newID})
			}
		}
		if s.next >= 0 {
			if mg, ok := m.merges[pairKey(s.id, syms[s.next].id)]; ok {
				h.push(candidate{mg.rank, c.pos, mg.newID})
			}
		}
	}
	ids := make([]int32, 0, len(syms))
	for i := int32(0); i >= 0; i = syms[i].next {
		ids = append(ids, syms[i].id)
	}
	return ids
}

// candHeap is a binary min-heap of merge candidates (container/heap would box each one).
type candHeap []candidate

func (h *candHeap) push(c candidate) {
	*h = append(*h, c)
	a := *h
	i := len(a) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !a[i].less(a[p]) {
			break
		}
		a[i], a[p] = a[p], a[i]
		i = p
	}
}

func (h *candHeap) pop() candidate {
	a := *h
	top := a[0]
	last := len(a) - 1
	a[0] = a[last]
	a = a[:last]
	i := 0
	for {
		l := 2*i + 1
		if l >= len(a) {
			break
		}
		small := l
		if r := l + 1; r < len(a) && a[r].less(a[l]) {
			small = r
		}
		if !a[small].less(a[i]) {
			break
		}
		a[i], a[small] = a[small], a[i]
		i = small
	}
	*h = a
	return top
}

// wordCache holds recent BPE results per word. Reads take no lock (sync.Map is built
// for this read-mostly use: hits read-lock nothing and write no shared memory); when it
// has grown past its bound it is emptied rather than evicted entry by entry, which bounds
// memory at no bookkeeping cost. Safe for concurrent use.
type wordCache struct {
	m sync.Map // string -> []int32
	n atomic.Int64
}

// wordCacheCap bounds the cached words; a few MB at most.
const wordCacheCap = 1 << 16

func newWordCache() *wordCache { return &wordCache{} }

// get returns the cached ids of word; the slice is shared and must not be modified.
func (c *wordCache) get(word string) ([]int32, bool) {
	v, ok := c.m.Load(word)
	if !ok {
		return nil, false
	}
	return v.([]int32), true
}

func (c *wordCache) put(word string, ids []int32) {
	if c.n.Add(1) > wordCacheCap {
		c.m.Clear()
		c.n.Store(0)
	}
	c.m.Store(strings.Clone(word), ids) // a clone: word may be a slice of a long request text
}
