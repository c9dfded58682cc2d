package cpu

// WithoutAVX512 switches the AVX-512 kernels off (the AVX2 and portable paths run, as on CPUs
// without AVX-512) until the returned function restores them.
func WithoutAVX512() (restore func()) {
	a, b, c := haveAVX512, attnAVX512, haveBF16
	haveAVX512, attnAVX512, haveBF16 = false, false, false
	return func() { haveAVX512, attnAVX512, haveBF16 = a, b, c }
}
