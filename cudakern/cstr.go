package cudakern

import (
	"runtime"
	"unsafe"
)

// goString copies the NUL-terminated C string at p.
func goString(p *byte) string {
	if p == nil {
		return ""
	}
	n := 0
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(p, n))
}

// cStrings is a C array of NUL-terminated strings (const char**) in Go memory, pinned for as
// long as C may read it: until unpin.
type cStrings struct {
	bufs [][]byte
	ptrs []*byte
	pin  runtime.Pinner
}

func newCStrings(ss []string) *cStrings {
	c := &cStrings{}
	for _, s := range ss {
		b := append([]byte(s), 0)
		c.bufs = append(c.bufs, b)
		c.pin.Pin(&b[0])
		c.ptrs = append(c.ptrs, &b[0])
	}
	if len(c.ptrs) > 0 {
		c.pin.Pin(&c.ptrs[0])
	}
	return c
}

// array is the const char** to pass (nil for no strings).
func (c *cStrings) array() **byte {
	if len(c.ptrs) == 0 {
		return nil
	}
	return &c.ptrs[0]
}

func (c *cStrings) unpin() { c.pin.Unpin() }
