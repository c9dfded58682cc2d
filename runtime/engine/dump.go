package engine

import (
	"context"
	"fmt"

	"github.com/loopserve/loopserve/runtime/model"
)

// Trace is every loop step's output for a prompt, computed exactly (all steps, every token's
// own per-step keys and values): the goldens' semantics.
type Trace struct {
	Steps, Len, Vocab, Width int
	StepLogits               []float32 // [R, S, V]
	GateLogits               []float32 // [R, S]
	ExitPDF                  []float32 // [R, S]
	Hidden                   []float32 // [R, S, H]: norm(h_t)
}

// Forward computes a Trace of ids with backend be. It checks ctx between loop steps.
func Forward(ctx context.Context, m *model.Model, be Backend, ids []int) (*Trace, error) {
	c := m.Config
	S, H, V, R := len(ids), c.HiddenSize, c.VocabSize, c.TotalUTSteps
	if S == 0 {
		return nil, fmt.Errorf("forward: empty prompt: %w", ErrInvalidRequest)
	}
	for _, id := range ids {
		if id < 0 || id >= V {
			return nil, fmt.Errorf("forward: token id %d outside vocabulary of %d: %w", id, V, ErrInvalidRequest)
		}
	}
	r := newRunner(m, be)
	kv := newKVCache(KVFull, R, c.NumHiddenLayers, c.KVDim(), false)
	kv.reserve(S) // no budget: always room
	rows := make([]fwdRow, S)
	for i := range rows {
		rows[i] = fwdRow{kv: kv, pos: i}
	}
	tr := &Trace{Steps: R, Len: S, Vocab: V, Width: H,
		StepLogits: make([]float32, R*S*V), GateLogits: make([]float32, R*S),
		ExitPDF: make([]float32, R*S), Hidden: make([]float32, R*S*H)}
	h := make([]float32, S*H) // [S, H]
	r.embed(h, ids)
	for t := 0; t < R; t++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		for i := range rows {
			rows[i].t = t
		}
		r.step(rows, h)
		copy(tr.Hidden[t*S*H:], h)
		copy(tr.StepLogits[t*S*V:], r.lmHead(h, S))
		for i := 0; i < S; i++ {
			tr.GateLogits[t*S+i] = r.gateLogit(h[i*H : (i+1)*H])
		}
	}
	g, p := make([]float32, R), make([]float32, R)
	for i := 0; i < S; i++ {
		for t := 0; t < R; t++ {
			g[t] = tr.GateLogits[t*S+i]
		}
		exitPDF(g, p, nil)
		for t := 0; t < R; t++ {
			tr.ExitPDF[t*S+i] = p[t]
		}
	}
	return tr, nil
}
