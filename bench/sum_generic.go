//go:build !amd64

package bench

func sumWords(p []uint64) uint64 { return sumWordsGo(p) }
