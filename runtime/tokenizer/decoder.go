package tokenizer

// Decoder turns a stream of token ids into text incrementally, for servers that send
// text as it is generated. It never splits a rune across chunks: bytes of a rune still
// missing its continuation bytes are held until a later id completes it or Flush. The
// chunks of a stream, Flush included, concatenate to Decode of all its ids.
//
// Create one per stream with Tokenizer.NewDecoder; a Decoder is not safe for concurrent
// use. The zero value is not usable.
type Decoder struct {
	t       *Tokenizer
	pending []byte // bytes of an incomplete rune
	out     []byte // scratch for the chunk being built
}

// NewDecoder returns a streaming decoder for one sequence of ids.
func (t *Tokenizer) NewDecoder() *Decoder {
	return &Decoder{t: t}
}

// Add feeds one id and returns the text it completes: "" while a rune is incomplete
// (or for an unknown id). An added token first ends any pending bytes (as U+FFFD, since
// nothing can complete them across it), then appears as its own text.
func (d *Decoder) Add(id int) string {
	if a, ok := d.t.added[id]; ok {
		s := d.Flush()
		return s + a.content
	}
	d.pending = d.t.appendTokenBytes(d.pending, id)
	n := completePrefix(d.pending)
	if n == 0 {
		return ""
	}
	d.out = appendLossy(d.out[:0], d.pending[:n])
	d.pending = append(d.pending[:0], d.pending[n:]...)
	return string(d.out)
}

// Flush returns what is pending, ill-formed bytes written as U+FFFD, and resets the
// decoder for reuse. Call it when the stream ends.
func (d *Decoder) Flush() string {
	if len(d.pending) == 0 {
		return ""
	}
	d.out = appendLossy(d.out[:0], d.pending)
	d.pending = d.pending[:0]
	return string(d.out)
}
