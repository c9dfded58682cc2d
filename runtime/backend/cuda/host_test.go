package cuda

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// TestTablePagesAndReuse: growing caches lays their pages into their regions' lists, layer by
// layer; freeing returns pages and regions; an exhausted pool fails the growth taking nothing.
func TestTablePagesAndReuse(t *testing.T) {
	p := newPages(10)
	tb := newTable(2, 3) // 2 layers, 3 pages per list
	full, err := tb.newKV(2)
	if err != nil {
		t.Fatal(err)
	}
	if err := tb.grow(p, full, 2); err != nil { // 2 blocks × 2 slots × 2 layers = 8 pages
		t.Fatal(err)
	}
	// Region r's list for layer l starts at (r·2 + l)·3; block b is entry b.
	want := []int32{0, 4, 0, 1, 5, 0, 2, 6, 0, 3, 7, 0}
	if diff := cmp.Diff(tb.tab, want); diff != "" {
		t.Errorf("page table (-got +want):\n%s", diff)
	}
	if tb.dirtyLo != 0 || tb.dirtyHi != 11 {
		t.Errorf("dirty entries [%d, %d), want [0, 11)", tb.dirtyLo, tb.dirtyHi)
	}
	last, err := tb.newKV(1)
	if err != nil {
		t.Fatal(err)
	}
	err = tb.grow(p, last, 2) // 4 pages, 2 free
	if !errors.Is(err, ErrKVFull) || p.available() != 2 {
		t.Errorf("growth past the pool: %v with %d pages free; want ErrKVFull and 2 free", err, p.available())
	}
	if err := tb.grow(p, last, 1); err != nil {
		t.Fatal(err)
	}
	if got, err := tb.off(last, 0, 15); err != nil || got != 12 {
		t.Errorf("off(last, 0, 15) = %d, %v; want 12 (the third region)", got, err)
	}
	for _, c := range []struct {
		slot, pos int
		want      string
	}{{1, 0, "slot 1 of a cache of 1 slots"}, {0, 16, "position 16 of a cache of 16 positions"}, {0, -1, "position -1"}} {
		if _, err := tb.off(last, c.slot, c.pos); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("off(last, %d, %d): %v, want %q", c.slot, c.pos, err, c.want)
		}
	}
	if err := tb.grow(p, full, 2); err == nil || !strings.Contains(err.Error(), "at most 48 positions") {
		t.Errorf("growth past the list width: %v", err)
	}
	if err := tb.free(p, full); err != nil {
		t.Fatal(err)
	}
	if p.available() != 8 {
		t.Errorf("%d pages free after FreeKV, want 8", p.available())
	}
	if _, err := tb.off(full, 0, 0); err == nil {
		t.Error("a freed handle still resolves")
	}
	again, err := tb.newKV(2)
	if err != nil {
		t.Fatal(err)
	}
	if again != full || len(tb.tab) != 3*6 {
		t.Errorf("reused handle %d (want %d), table of %d entries (want 18: regions reused)", again, full, len(tb.tab))
	}
	if _, err := tb.newKV(0); err == nil {
		t.Error("a cache of 0 slots was made")
	}
}

// TestCopyWaves: the engine's copies become per-layer jobs, split where a job reads or
// rewrites a position an earlier job of the wave writes.
func TestCopyWaves(t *testing.T) {
	p := newPages(64)
	tb := newTable(2, 4)
	a, _ := tb.newKV(3)
	if err := tb.grow(p, a, 1); err != nil {
		t.Fatal(err)
	}
	R := func(slot int) int32 { return int32(slot * 8) } // region of slot s: s·layers·maxPages
	j, err := tb.copies([]engine.KVCopy{
		{Dst: a, Src: a, DstSlot: 1, SrcSlot: 0, DstPos: 0, SrcPos: 0, N: 2}, // slot 0 → 1, positions 0, 1
		{Dst: a, Src: a, DstSlot: 2, SrcSlot: 1, DstPos: 1, SrcPos: 1, N: 1}, // reads slot 1 pos 1: a new wave
		{Dst: a, Src: a, DstSlot: 2, SrcSlot: 2, DstPos: 3, SrcPos: 3, N: 1}, // a no-op
		{Dst: a, Src: a, DstSlot: 2, SrcSlot: 0, DstPos: 5, SrcPos: 4, N: 0}, // nothing
	})
	if err != nil {
		t.Fatal(err)
	}
	want := copies{
		srcOff: []int32{R(0), R(0) + 4, R(0), R(0) + 4, R(1), R(1) + 4},
		srcPos: []int32{0, 0, 1, 1, 1, 1},
		dstOff: []int32{R(1), R(1) + 4, R(1), R(1) + 4, R(2), R(2) + 4},
		dstPos: []int32{0, 0, 1, 1, 1, 1},
		waves:  []int{4, 6},
	}
	if diff := cmp.Diff(j, want, cmp.AllowUnexported(copies{})); diff != "" {
		t.Errorf("copies (-got +want):\n%s", diff)
	}
	for _, bad := range []engine.KVCopy{
		{Dst: a, Src: a, DstSlot: 3, N: 1},
		{Dst: a, Src: a, SrcPos: 10, N: 7},
		{Dst: a, Src: 9, N: 1},
		{Dst: a, Src: a, N: -1},
	} {
		if _, err := tb.copies([]engine.KVCopy{bad}); err == nil {
			t.Errorf("copy %+v accepted", bad)
		}
	}
}

// TestPlanRows: the per-row arguments, prefill tiles and decode rows, head rows and top-k
// width of a mixed batch; bad rows are errors naming the row.
func TestPlanRows(t *testing.T) {
	c := model.Config{TotalUTSteps: 4, VocabSize: 100}
	p := newPages(64)
	tb := newTable(1, 4)
	a, _ := tb.newKV(4)
	b, _ := tb.newKV(1)
	for _, kv := range []engine.KV{a, b} {
		if err := tb.grow(p, kv, 2); err != nil {
			t.Fatal(err)
		}
	}
	rule := engine.ExitRule{Tau: 0.5, MaxDepth: 4}
	rows := []engine.Row{
		{State: 3, Token: 7, Step: 0, Pos: 0, KV: a, Slot: 0, Exit: rule, ExitIn: engine.StartExit},
		{State: 4, Token: 8, Step: 0, Pos: 1, KV: a, Slot: 0, Exit: rule, ExitIn: engine.StartExit, Head: engine.Head{AtExit: true, Top: 5}},
		{State: 0, Step: 2, Pos: 20, KV: b, Slot: 0, Exit: rule, ExitIn: engine.ExitState{Rest: 0.5, Cum: 0.5, Chosen: 1}, Head: engine.Head{AtExit: true}},
		{State: 1, Step: 1, Pos: 9, KV: a, Slot: 1, Exit: rule, ExitIn: engine.StartExit, Head: engine.Head{Every: true, Logits: true, Score: true, ScoreID: 42}},
	}
	var pl plan
	if err := pl.build(rows, tb, c); err != nil {
		t.Fatal(err)
	}
	got := map[string][]int32{
		"state": pl.arrays[argState], "pos": pl.arrays[argPos], "tab": pl.arrays[argTabOff], "step": pl.arrays[argStep],
		"embedID": pl.arrays[argEmbedID], "embedRow": pl.arrays[argEmbedRow], "tiles": pl.arrays[argTiles],
		"single": pl.arrays[argSingle], "head": pl.arrays[argHead], "score": pl.arrays[argScoreID],
	}
	want := map[string][]int32{
		"state": {3, 4, 0, 1}, "pos": {0, 1, 20, 9}, "tab": {0, 0, 16, 4}, "step": {0, 0, 2, 1},
		"embedID": {7, 8}, "embedRow": {0, 1}, "tiles": {0, 2}, "single": {2, 3},
		"head": {1, 3}, "score": {0, 42}, // row 2 has decided its exit: no head
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("plan (-got +want):\n%s", diff)
	}
	if pl.maxState != 4 || pl.maxDecodePos != 20 || pl.k != 5 || !pl.logits {
		t.Errorf("maxState %d, maxDecodePos %d, k %d, logits %v; want 4, 20, 5, true", pl.maxState, pl.maxDecodePos, pl.k, pl.logits)
	}
	if diff := cmp.Diff(pl.headOf, []int{-1, 0, -1, 1}); diff != "" {
		t.Errorf("headOf (-got +want):\n%s", diff)
	}
	packed := pl.ints()
	if pl.len[argPos] != 4 || packed[pl.at[argPos]+2] != 20 {
		t.Errorf("packed positions at %d (len %d): %v", pl.at[argPos], pl.len[argPos], packed)
	}
	ok := rows[0]
	for _, tc := range []struct {
		edit func(*engine.Row)
		want string
	}{
		{func(r *engine.Row) { r.Token = 100 }, "row 0: token 100 outside the vocabulary of 100"},
		{func(r *engine.Row) { r.Step = 4 }, "row 0: loop step 4 of 4"},
		{func(r *engine.Row) { r.State = -1 }, "row 0: state slot -1"},
		{func(r *engine.Row) { r.Pos = 32 }, "row 0: position 32 of a cache of 32 positions"},
		{func(r *engine.Row) { r.KV = 7 }, "row 0: KV handle 7"},
		{func(r *engine.Row) { r.Head = engine.Head{Every: true, Score: true, ScoreID: -3} }, "row 0: scored token -3"},
	} {
		r := ok
		tc.edit(&r)
		if err := pl.build([]engine.Row{r}, tb, c); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v", tc.want, err)
		}
	}
	if err := pl.build([]engine.Row{ok, ok}, tb, c); err == nil || !strings.Contains(err.Error(), "share state slot 3") {
		t.Errorf("shared state slot: %v", err)
	}
}
