package bench

import "golang.org/x/sys/cpu"

// sumWordsAVX2 adds p's words 16 at a time (two cache lines per iteration) with four vector
// accumulators; len(p) must be a multiple of 16.
//
//go:noescape
func sumWordsAVX2(p []uint64) uint64

// sumWords reads every word of p; the wide loads keep a core's load ports from being the limit,
// so a pass measures memory rather than the instruction stream.
func sumWords(p []uint64) uint64 {
	if !cpu.X86.HasAVX2 {
		return sumWordsGo(p)
	}
	n := len(p) &^ 15
	return sumWordsAVX2(p[:n]) + sumWordsGo(p[n:])
}
