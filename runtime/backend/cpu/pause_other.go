//go:build !amd64

package cpu

// spinPause is a spin-wait step (a no-op where no hint instruction is wired).
func spinPause() {}
