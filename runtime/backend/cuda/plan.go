package cuda

import (
	"fmt"

	"github.com/loopserve/loopserve/cudakern"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// intArg names one int32 array of a step's uploaded arguments.
type intArg int

const (
	argState    intArg = iota // [n] the rows' state slots (gather, scatter)
	argPos                    // [n] positions
	argTabOff                 // [n] page-table offsets of the rows' (cache, slot)
	argStep                   // [n] loop steps (exit_decide)
	argEmbedID                // [m0] token ids of the step-0 rows
	argEmbedRow               // [m0] their batch rows
	argTiles                  // prefill tiles: (first row, rows) pairs
	argSingle                 // batch rows attending alone (decode)
	argHead                   // [mh] batch rows the LM head runs on
	argScoreID                // [mh] the token each head row scores
	numArgs
)

// plan is one step's host-side plan: the validated rows turned into the int32 arguments the
// launches read, packed in one array (at/len per intArg), and the head rows. It makes no
// device call: the tests check it directly.
type plan struct {
	arrays       [numArgs][]int32
	at, len      [numArgs]int
	packed       []int32
	maxState     int
	maxDecodePos int
	head         []int32 // batch rows the head runs on
	headOf       []int   // per batch row, its index in head, or -1
	k            int     // top-k width computed on the device (≥ 1)
	logits       bool    // some head row needs its logits on the host
}

// headWanted is whether the head may run on r at this step: always with Every, and with AtExit
// when the row's exit is not decided yet (the device decides it in this step; the host keeps
// the head's results only where it did).
func headWanted(r engine.Row) bool {
	return r.Head.Every || (r.Head.AtExit && r.ExitIn.Chosen < 0)
}

// build validates rows and fills p. Bad rows are errors that name the row; nothing is queued.
func (p *plan) build(rows []engine.Row, t *table, c model.Config) error {
	for i := range p.arrays {
		p.arrays[i] = p.arrays[i][:0]
	}
	p.head, p.headOf = p.head[:0], p.headOf[:0]
	p.maxState, p.maxDecodePos, p.k, p.logits = 0, 0, 1, false
	R, V := c.TotalUTSteps, c.VocabSize
	seen := map[int]int{}
	for i, r := range rows {
		switch {
		case r.State < 0 || r.State >= 1<<24:
			return fmt.Errorf("row %d: state slot %d", i, r.State)
		case r.Step < 0 || r.Step >= R:
			return fmt.Errorf("row %d: loop step %d of %d", i, r.Step, R)
		case r.Step == 0 && (r.Token < 0 || r.Token >= V):
			return fmt.Errorf("row %d: token %d outside the vocabulary of %d", i, r.Token, V)
		case r.Head.Score && (r.Head.ScoreID < 0 || r.Head.ScoreID >= V):
			return fmt.Errorf("row %d: scored token %d outside the vocabulary of %d", i, r.Head.ScoreID, V)
		case r.Head.Top < 0:
			return fmt.Errorf("row %d: top %d", i, r.Head.Top)
		}
		if j, dup := seen[r.State]; dup {
			return fmt.Errorf("rows %d and %d share state slot %d", j, i, r.State)
		}
		seen[r.State] = i
		off, err := t.off(r.KV, r.Slot, r.Pos)
		if err != nil {
			return fmt.Errorf("row %d: %w", i, err)
		}
		p.maxState = max(p.maxState, r.State)
		p.arrays[argState] = append(p.arrays[argState], int32(r.State))
		p.arrays[argPos] = append(p.arrays[argPos], int32(r.Pos))
		p.arrays[argTabOff] = append(p.arrays[argTabOff], off)
		p.arrays[argStep] = append(p.arrays[argStep], int32(r.Step))
		if r.Step == 0 {
			p.arrays[argEmbedID] = append(p.arrays[argEmbedID], int32(r.Token))
			p.arrays[argEmbedRow] = append(p.arrays[argEmbedRow], int32(i))
		}
		h := -1
		if headWanted(r) {
			h = len(p.head)
			p.head = append(p.head, int32(i))
			id := 0
			if r.Head.Score {
				id = r.Head.ScoreID
			}
			p.arrays[argScoreID] = append(p.arrays[argScoreID], int32(id))
			if r.Head.Top > cudakern.MaxTopK || r.Head.Logits {
				p.logits = true
			}
			p.k = max(p.k, min(r.Head.Top, cudakern.MaxTopK, V))
		}
		p.headOf = append(p.headOf, h)
	}
	tiles, single := cudakern.PlanTiles(p.arrays[argTabOff])
	p.arrays[argTiles] = append(p.arrays[argTiles], tiles...)
	p.arrays[argSingle] = append(p.arrays[argSingle], single...)
	for _, r := range single {
		p.maxDecodePos = max(p.maxDecodePos, rows[r].Pos)
	}
	p.arrays[argHead] = append(p.arrays[argHead], p.head...)
	return nil
}

// ints packs the arrays into one upload and records where each starts.
func (p *plan) ints() []int32 {
	p.packed = p.packed[:0]
	for a := range p.arrays {
		p.at[a], p.len[a] = len(p.packed), len(p.arrays[a])
		p.packed = append(p.packed, p.arrays[a]...)
	}
	return p.packed
}

// exitStates appends the rows' device exit states: the engine's state and rule.
func (p *plan) exitStates(dst []cudakern.ExitState, rows []engine.Row) []cudakern.ExitState {
	for _, r := range rows {
		st := cudakern.NewExitState(r.Exit.Tau, r.Exit.MaxDepth, r.Exit.Forced)
		st.Rest, st.Cum, st.Chosen = r.ExitIn.Rest, r.ExitIn.Cum, int32(r.ExitIn.Chosen)
		dst = append(dst, st)
	}
	return dst
}
