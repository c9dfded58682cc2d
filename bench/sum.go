package bench

// sumWordsGo adds every word of p with eight independent accumulators, one cache line per
// iteration, so the loop is bound by loads rather than by the add chain. len(p) must be a
// multiple of 8.
func sumWordsGo(p []uint64) uint64 {
	var s0, s1, s2, s3, s4, s5, s6, s7 uint64
	for i := 0; i+8 <= len(p); i += 8 {
		q := p[i : i+8 : i+8]
		s0 += q[0]
		s1 += q[1]
		s2 += q[2]
		s3 += q[3]
		s4 += q[4]
		s5 += q[5]
		s6 += q[6]
		s7 += q[7]
	}
	return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7
}
