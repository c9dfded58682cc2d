package model

import (
	"errors"
	"math"
	"testing"
)

// FuzzParseHeader checks that no header makes the parser panic, and that every accepted
// entry lies inside the data section with a size matching its dtype and shape.
func FuzzParseHeader(f *testing.F) {
	f.Add([]byte(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`), int64(8))
	f.Add([]byte(`{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}`), int64(12))
	f.Add([]byte(`{"a":{"dtype":"F16","shape":[],"data_offsets":[0,2]},"b":{"dtype":"I64","shape":[1],"data_offsets":[2,10]}}`), int64(10))
	f.Add([]byte(`{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}`), int64(0))
	f.Add([]byte(`{`), int64(0))
	f.Fuzz(func(t *testing.T, header []byte, dataLen int64) {
		if dataLen < 0 {
			dataLen = -dataLen
		}
		infos, _, err := ParseHeader(header, dataLen)
		if err != nil {
			if !errors.Is(err, ErrBadHeader) && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrDType) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		var prevEnd int64
		for _, in := range infos {
			n := int64(in.DType.Size())
			for _, d := range in.Shape {
				n *= int64(d)
				if n > math.MaxInt64/2 {
					break
				}
			}
			if in.Begin < prevEnd || in.End > dataLen || in.End-in.Begin != n {
				t.Fatalf("accepted entry %+v (data %d, previous end %d)", in, dataLen, prevEnd)
			}
			prevEnd = in.End
		}
	})
}
