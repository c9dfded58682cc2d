package serve

import "github.com/loopserve/loopserve/runtime/tokenizer"

// FromTokenizer adapts a Hugging Face tokenizer to the worker's Tokenizer.
func FromTokenizer(t *tokenizer.Tokenizer) Tokenizer { return hfTokenizer{t} }

type hfTokenizer struct{ t *tokenizer.Tokenizer }

func (h hfTokenizer) Encode(text string) []int { return h.t.Encode(text) }

func (h hfTokenizer) ChatPrompt(msgs []Message) (string, error) {
	m := make([]tokenizer.Message, len(msgs))
	for i, x := range msgs {
		m[i] = tokenizer.Message{Role: x.Role, Content: x.Content}
	}
	return h.t.ApplyChat(m, true)
}

func (h hfTokenizer) NewTextDecoder() TextDecoder { return h.t.NewDecoder() }

func (h hfTokenizer) Decode(ids []int) string { return h.t.Decode(ids) }

func (h hfTokenizer) TokenBytes(id int) []byte { return h.t.TokenBytes(id) }
