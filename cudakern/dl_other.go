//go:build !linux

package cudakern

import "errors"

var errNoDlopen = errors.New("dynamic loading is not supported on this platform")

func dlopen(string) (uintptr, error) { return 0, errNoDlopen }

func dlsym(uintptr, string) (uintptr, error) { return 0, errNoDlopen }

func registerFunc(any, uintptr) { panic("cudakern: no dynamic loading on this platform") }

func ccall(uintptr, ...uintptr) uintptr { panic("cudakern: no dynamic loading on this platform") }
