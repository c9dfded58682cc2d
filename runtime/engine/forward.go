package engine

// exitPDF converts gate logits [R] of one token into its exit distribution p[R] and
// cumulative c[R]: p_t = λ_t Π_{j<t}(1−λ_j), the last step takes the rest.
func exitPDF(gates, p, c []float32) {
	R := len(gates)
	rest := float32(1)
	var cum float32
	for t := 0; t < R; t++ {
		if t == R-1 {
			p[t] = rest
		} else {
			lam := sigmoid(gates[t])
			p[t] = lam * rest
			rest *= 1 - lam
		}
		cum += p[t]
		if c != nil {
			c[t] = cum
		}
	}
}
