package engine

import (
	"context"
	"errors"
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
func Forward(ctx context.Context, m *model.Model, be Backend, ids []int) (tr *Trace, err error) {
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
	ex, err := be.Load(m, LoadOptions{})
	if err != nil {
		return nil, fmt.Errorf("forward: loading the model: %w", err)
	}
	defer func() { err = errors.Join(err, ex.Close()) }()
	st, err := ex.NewStream()
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	defer func() { err = errors.Join(err, st.Close()) }()
	kv, err := st.NewKV(R)
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	if err := st.GrowKV(kv, (S+ex.KVBlock()-1)/ex.KVBlock()); err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	b := Batch{Rows: make([]Row, S), Out: make([]RowOut, S)}
	for i := range b.Rows {
		b.Rows[i] = Row{State: i, Token: ids[i], Pos: i, KV: kv, Exit: ExitRule{MaxDepth: R, Forced: true}, ExitIn: StartExit,
			Head: Head{Every: true, Logits: true}}
	}
	tr = &Trace{Steps: R, Len: S, Vocab: V, Width: H,
		StepLogits: make([]float32, R*S*V), GateLogits: make([]float32, R*S),
		ExitPDF: make([]float32, R*S), Hidden: make([]float32, R*S*H)}
	for t := 0; t < R; t++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		for i := range b.Rows {
			b.Rows[i].Step, b.Rows[i].Slot = t, t
		}
		if err := st.Step(&b); err != nil {
			return nil, fmt.Errorf("forward: step %d: %w", t, err)
		}
		for i := range b.Rows {
			o := &b.Out[i]
			b.Rows[i].ExitIn = o.Exit
			copy(tr.StepLogits[(t*S+i)*V:(t*S+i+1)*V], o.Logits)
			tr.GateLogits[t*S+i] = o.Gate
		}
		for i := range b.Rows {
			st.State(i, tr.Hidden[(t*S+i)*H:(t*S+i+1)*H])
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
