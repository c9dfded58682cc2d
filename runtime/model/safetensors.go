package model

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sort"
	"strings"
	"unsafe"
)

// MaxHeaderSize bounds the JSON header of a safetensors file (the reference implementation's
// limit): a larger declared size is a corrupt or hostile file, not a model.
const MaxHeaderSize = 100 << 20

// Tensor is a named n-dimensional array in safetensors layout (row-major, little-endian).
// Data aliases the file mapping for tensors read from a File: it is read-only and valid until
// the File is closed.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// Len is the number of elements (1 for a scalar).
func (t Tensor) Len() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Float32 converts a floating-point tensor to a new []float32.
func (t Tensor) Float32() ([]float32, error) {
	n := t.Len()
	if len(t.Data) != n*t.DType.Size() {
		return nil, fmt.Errorf("tensor %s: %d bytes for %d %s elements: %w", t.Name, len(t.Data), n, t.DType, ErrShape)
	}
	out := make([]float32, n)
	switch t.DType {
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
		}
	case BF16:
		for i := range out {
			out[i] = BF16ToF32(binary.LittleEndian.Uint16(t.Data[2*i:]))
		}
	case F16:
		for i := range out {
			out[i] = F16ToF32(binary.LittleEndian.Uint16(t.Data[2*i:]))
		}
	default:
		return nil, fmt.Errorf("tensor %s: %s is not a float type: %w", t.Name, t.DType, ErrDType)
	}
	return out, nil
}

// Int64 converts an I64 tensor to a new []int64.
func (t Tensor) Int64() ([]int64, error) {
	if t.DType != I64 || len(t.Data) != 8*t.Len() {
		return nil, fmt.Errorf("tensor %s: want I64, found %s with %d bytes: %w", t.Name, t.DType, len(t.Data), ErrDType)
	}
	out := make([]int64, t.Len())
	for i := range out {
		out[i] = int64(binary.LittleEndian.Uint64(t.Data[8*i:]))
	}
	return out, nil
}

// F32Tensor builds an F32 tensor from values; len(v) must equal the product of shape.
func F32Tensor(name string, shape []int, v []float32) Tensor {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return Tensor{Name: name, DType: F32, Shape: slices.Clone(shape), Data: b}
}

// BF16Tensor builds a BF16 tensor by rounding values; len(v) must equal the product of shape.
func BF16Tensor(name string, shape []int, v []float32) Tensor {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], F32ToBF16(x))
	}
	return Tensor{Name: name, DType: BF16, Shape: slices.Clone(shape), Data: b}
}

// I64Tensor builds an I64 tensor; len(v) must equal the product of shape.
func I64Tensor(name string, shape []int, v []int64) Tensor {
	b := make([]byte, 8*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint64(b[8*i:], uint64(x))
	}
	return Tensor{Name: name, DType: I64, Shape: slices.Clone(shape), Data: b}
}

// TensorInfo is one header entry: where a tensor lies in the data section.
type TensorInfo struct {
	Name       string
	DType      DType
	Shape      []int
	Begin, End int64 // byte offsets in the data section
}

type headerEntry struct {
	DType       string  `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// ParseHeader decodes a safetensors JSON header and checks every entry against a data section
// of dataLen bytes: known dtype, non-negative shape, offsets inside the data and matching the
// shape, no overlaps. It returns the entries sorted by offset and the __metadata__ map.
func ParseHeader(header []byte, dataLen int64) ([]TensorInfo, map[string]string, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(header, &raw); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	var meta map[string]string
	infos := make([]TensorInfo, 0, len(raw))
	for name, msg := range raw {
		if name == "__metadata__" {
			if err := json.Unmarshal(msg, &meta); err != nil {
				return nil, nil, fmt.Errorf("%w: __metadata__: %w", ErrBadHeader, err)
			}
			continue
		}
		var e headerEntry
		dec := json.NewDecoder(strings.NewReader(string(msg)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&e); err != nil {
			return nil, nil, fmt.Errorf("%w: tensor %q: %w", ErrBadHeader, name, err)
		}
		dt, err := parseDType(e.DType)
		if err != nil {
			return nil, nil, fmt.Errorf("tensor %q: %w", name, err)
		}
		if len(e.DataOffsets) != 2 {
			return nil, nil, fmt.Errorf("%w: tensor %q: data_offsets has %d values, want 2", ErrBadHeader, name, len(e.DataOffsets))
		}
		n := int64(1)
		shape := make([]int, len(e.Shape))
		for i, d := range e.Shape {
			if d < 0 || d > math.MaxInt32 {
				return nil, nil, fmt.Errorf("%w: tensor %q: dimension %d", ErrBadHeader, name, d)
			}
			shape[i] = int(d)
			if d != 0 && n > math.MaxInt64/d {
				return nil, nil, fmt.Errorf("%w: tensor %q: shape %v overflows", ErrBadHeader, name, e.Shape)
			}
			n *= d
		}
		begin, end := e.DataOffsets[0], e.DataOffsets[1]
		if begin < 0 || end < begin {
			return nil, nil, fmt.Errorf("%w: tensor %q: data_offsets [%d, %d]", ErrBadHeader, name, begin, end)
		}
		if n > math.MaxInt64/int64(dt.Size()) || end-begin != n*int64(dt.Size()) {
			return nil, nil, fmt.Errorf("%w: tensor %q: %s %v needs %d bytes, data_offsets span %d", ErrBadHeader, name, dt, shape, n*int64(dt.Size()), end-begin)
		}
		if end > dataLen {
			return nil, nil, fmt.Errorf("%w: tensor %q ends at byte %d of a %d-byte data section", ErrTruncated, name, end, dataLen)
		}
		infos = append(infos, TensorInfo{Name: name, DType: dt, Shape: shape, Begin: begin, End: end})
	}
	sort.Slice(infos, func(i, j int) bool {
		if infos[i].Begin != infos[j].Begin {
			return infos[i].Begin < infos[j].Begin
		}
		return infos[i].Name < infos[j].Name
	})
	for i := 1; i < len(infos); i++ {
		if infos[i].Begin < infos[i-1].End {
			return nil, nil, fmt.Errorf("%w: tensors %q and %q overlap", ErrBadHeader, infos[i-1].Name, infos[i].Name)
		}
	}
	return infos, meta, nil
}

// File is an open safetensors file, mapped read-only into memory (or read whole where mmap is
// unavailable). Its methods are safe for concurrent use; Close invalidates every Tensor.Data it
// returned.
type File struct {
	Path     string
	Metadata map[string]string
	infos    map[string]TensorInfo
	order    []string
	data     []byte // the data section
	mapped   []byte // the whole mapping, nil when read into memory
}

// OpenSafetensors opens and validates a safetensors file.
func OpenSafetensors(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening safetensors: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("opening safetensors: %w", err)
	}
	size := st.Size()
	if size < 8 {
		return nil, fmt.Errorf("%s: %d bytes, need at least 8: %w", path, size, ErrTruncated)
	}
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		return nil, fmt.Errorf("%s: reading header size: %w", path, err)
	}
	hlen := binary.LittleEndian.Uint64(lenBuf[:])
	if hlen > MaxHeaderSize {
		return nil, fmt.Errorf("%s: header declares %d bytes, limit %d: %w", path, hlen, MaxHeaderSize, ErrHeaderTooLarge)
	}
	if int64(hlen) > size-8 {
		return nil, fmt.Errorf("%s: header declares %d bytes, file has %d after the size: %w", path, hlen, size-8, ErrTruncated)
	}
	var whole []byte
	mapped := false
	if size > 0 && size <= math.MaxInt {
		if b, err := mmap(f, int(size)); err == nil {
			whole, mapped = b, true
		}
	}
	if !mapped {
		whole = make([]byte, size)
		if _, err := f.ReadAt(whole, 0); err != nil {
			return nil, fmt.Errorf("reading %s: %w", path, err)
		}
	}
	infos, meta, err := ParseHeader(whole[8:8+hlen], size-8-int64(hlen))
	if err != nil {
		if mapped {
			_ = munmap(whole)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	sf := &File{Path: path, Metadata: meta, infos: make(map[string]TensorInfo, len(infos)), data: whole[8+hlen:]}
	if mapped {
		sf.mapped = whole
	}
	for _, in := range infos {
		sf.infos[in.Name] = in
		sf.order = append(sf.order, in.Name)
	}
	return sf, nil
}

// Names lists the tensors in file order.
func (f *File) Names() []string { return slices.Clone(f.order) }

// Info returns a tensor's header entry.
func (f *File) Info(name string) (TensorInfo, bool) {
	in, ok := f.infos[name]
	return in, ok
}

// Tensor returns a tensor whose Data aliases the file.
func (f *File) Tensor(name string) (Tensor, error) {
	in, ok := f.infos[name]
	if !ok {
		return Tensor{}, fmt.Errorf("%s: tensor %q: %w", f.Path, name, ErrMissingTensor)
	}
	return Tensor{Name: name, DType: in.DType, Shape: slices.Clone(in.Shape), Data: f.data[in.Begin:in.End:in.End]}, nil
}

// Close unmaps the file.
func (f *File) Close() error {
	if f.mapped != nil {
		err := munmap(f.mapped)
		f.mapped, f.data = nil, nil
		if err != nil {
			return fmt.Errorf("unmapping %s: %w", f.Path, err)
		}
	}
	return nil
}

// WriteSafetensors writes tensors (in the given order) and metadata to path. The header is
// padded with spaces to a multiple of 8 bytes so every tensor starts aligned.
func WriteSafetensors(path string, tensors []Tensor, metadata map[string]string) (err error) {
	header := make(map[string]any, len(tensors)+1)
	if len(metadata) > 0 {
		header["__metadata__"] = metadata
	}
	var off int64
	for _, t := range tensors {
		if t.Name == "" || t.Name == "__metadata__" {
			return fmt.Errorf("writing %s: tensor name %q: %w", path, t.Name, ErrBadHeader)
		}
		if _, dup := header[t.Name]; dup {
			return fmt.Errorf("writing %s: duplicate tensor %q: %w", path, t.Name, ErrBadHeader)
		}
		if t.DType.Size() == 0 || len(t.Data) != t.Len()*t.DType.Size() {
			return fmt.Errorf("writing %s: tensor %q: %d bytes for %s %v: %w", path, t.Name, len(t.Data), t.DType, t.Shape, ErrShape)
		}
		shape := t.Shape
		if shape == nil {
			shape = []int{}
		}
		header[t.Name] = map[string]any{"dtype": t.DType.String(), "shape": shape, "data_offsets": []int64{off, off + int64(len(t.Data))}}
		off += int64(len(t.Data))
	}
	hb, err := json.Marshal(header)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	for len(hb)%8 != 0 {
		hb = append(hb, ' ')
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("writing safetensors: %w", err)
	}
	defer func() {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("writing %s: %w", path, cerr)
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(hb)))
	if _, err := w.Write(lenBuf[:]); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := w.Write(hb); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	for _, t := range tensors {
		if _, err := w.Write(t.Data); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// ReadSafetensors reads every tensor of a file into memory (copies, independent of the file).
func ReadSafetensors(path string) ([]Tensor, map[string]string, error) {
	f, err := OpenSafetensors(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	out := make([]Tensor, 0, len(f.order))
	for _, name := range f.order {
		t, err := f.Tensor(name)
		if err != nil {
			return nil, nil, err
		}
		t.Data = slices.Clone(t.Data)
		out = append(out, t)
	}
	return out, f.Metadata, nil
}

// alignedU16 views b as []uint16 when it is 2-byte aligned, else copies it.
func alignedU16(b []byte) []uint16 {
	if len(b) == 0 {
		return nil
	}
	if uintptr(unsafe.Pointer(&b[0]))%2 == 0 {
		return unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(b)/2)
	}
	out := make([]uint16, len(b)/2)
	for i := range out {
		out[i] = binary.LittleEndian.Uint16(b[2*i:])
	}
	return out
}

// alignedF32 views b as []float32 when it is 4-byte aligned, else copies it.
func alignedF32(b []byte) []float32 {
	if len(b) == 0 {
		return nil
	}
	if uintptr(unsafe.Pointer(&b[0]))%4 == 0 {
		return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4)
	}
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}
