//go:build linux

package cudakern

import "github.com/ebitengine/purego"

func dlopen(path string) (uintptr, error) {
	return purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
}

func dlsym(h uintptr, name string) (uintptr, error) { return purego.Dlsym(h, name) }

func registerFunc(fptr any, p uintptr) { purego.RegisterFunc(fptr, p) }

// ccall calls the C function fn with integer and pointer arguments (the hot paths: kernel
// and graph launches, where RegisterFunc's reflection would cost more than the call).
func ccall(fn uintptr, args ...uintptr) uintptr {
	r, _, _ := purego.SyscallN(fn, args...)
	return r
}
