package model

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const testdataDir = "../../testdata"

func TestLoadTinyModels(t *testing.T) {
	for _, tc := range []struct {
		dir                   string
		layers, hidden, kvDim int
		firstEmbed            float32
	}{
		{dir: testdataDir + "/models/ouro-tiny-random", layers: 2, hidden: 64, kvDim: 32},
		{dir: testdataDir + "/models/ouro-tiny-arith", layers: 4, hidden: 256, kvDim: 128},
		{dir: "../../testdata/models/ouro-tiny-arith", layers: 4, hidden: 256, kvDim: 128},
	} {
		t.Run(filepath.Base(tc.dir), func(t *testing.T) {
			m, err := Load(tc.dir)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			c := m.Config
			if got := []int{len(m.Layers), c.HiddenSize, c.KVDim(), c.TotalUTSteps}; !cmp.Equal(got, []int{tc.layers, tc.hidden, tc.kvDim, 4}) {
				t.Errorf("layers, hidden, kvDim, steps = %v", got)
			}
			if m.Embed.BF16 == nil || m.Embed.Rows != 1024 || m.Embed.Cols != tc.hidden {
				t.Errorf("embed %dx%d bf16=%v", m.Embed.Rows, m.Embed.Cols, m.Embed.BF16 != nil)
			}
			// The widened values must be the file's bf16 values.
			f, err := OpenSafetensors(filepath.Join(tc.dir, "model.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			tn, err := f.Tensor("model.layers.1.mlp.down_proj.weight")
			if err != nil {
				t.Fatal(err)
			}
			want, err := tn.Float32()
			if err != nil {
				t.Fatal(err)
			}
			row := make([]float32, m.Layers[1].Down.Cols)
			m.Layers[1].Down.Row(3, row)
			if diff := cmp.Diff(row, want[3*len(row):4*len(row)]); diff != "" {
				t.Errorf("down_proj row 3 (-got +want):\n%s", diff)
			}
		})
	}
}

func TestWriteReadRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.safetensors")
	in := []Tensor{
		I64Tensor("ids", []int{3}, []int64{1, -2, 3}),
		F32Tensor("f", []int{2, 2}, []float32{1.5, -2, 3.25, 0}),
		BF16Tensor("b", []int{3}, []float32{1, -0.5, 3}),
		F32Tensor("scalar", []int{}, []float32{7}),
	}
	if err := WriteSafetensors(path, in, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
	got, meta, err := ReadSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(meta, map[string]string{"format": "pt"}); diff != "" {
		t.Errorf("metadata (-got +want):\n%s", diff)
	}
	byName := map[string]Tensor{}
	for _, x := range got {
		byName[x.Name] = x
	}
	for _, w := range in {
		g := byName[w.Name]
		if g.DType != w.DType || !cmp.Equal(g.Shape, w.Shape) || !bytes.Equal(g.Data, w.Data) {
			t.Errorf("%s: got %s %v, want %s %v", w.Name, g.DType, g.Shape, w.DType, w.Shape)
		}
	}
	b, _ := byName["b"].Float32()
	if diff := cmp.Diff(b, []float32{1, -0.5, 3}); diff != "" {
		t.Errorf("bf16 (-got +want):\n%s", diff)
	}
	ids, _ := byName["ids"].Int64()
	if diff := cmp.Diff(ids, []int64{1, -2, 3}); diff != "" {
		t.Errorf("ids (-got +want):\n%s", diff)
	}
}

func TestF16(t *testing.T) {
	for _, tc := range []struct {
		bits uint16
		want float32
	}{
		{0x3c00, 1}, {0xc000, -2}, {0x0001, 5.960464477539063e-08}, {0x7bff, 65504}, {0x0000, 0}, {0x3555, 0.333251953125},
	} {
		if got := F16ToF32(tc.bits); got != tc.want {
			t.Errorf("F16ToF32(%#x) = %g, want %g", tc.bits, got, tc.want)
		}
	}
}

// rawFile writes a safetensors file with an arbitrary header and data section.
func rawFile(t *testing.T, header string, data []byte) string {
	t.Helper()
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	p := filepath.Join(t.TempDir(), "bad.safetensors")
	if err := os.WriteFile(p, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestOpenErrors(t *testing.T) {
	huge := make([]byte, 8)
	binary.LittleEndian.PutUint64(huge, MaxHeaderSize+1)
	hugePath := filepath.Join(t.TempDir(), "huge.safetensors")
	if err := os.WriteFile(hugePath, huge, 0o644); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(t.TempDir(), "short.safetensors")
	if err := os.WriteFile(short, []byte{1, 2, 3}, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path, msg string
		want            error
	}{
		{"too short", short, "need at least 8", ErrTruncated},
		{"header too large", hugePath, "limit", ErrHeaderTooLarge},
		{"header past end", writeLen(t, 1000), "header declares", ErrTruncated},
		{"not json", rawFile(t, `{nope`, nil), "bad safetensors header", ErrBadHeader},
		{"truncated data", rawFile(t, `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, make([]byte, 4)), `tensor "a" ends at byte 8`, ErrTruncated},
		{"size mismatch", rawFile(t, `{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, make([]byte, 8)), "needs 12 bytes", ErrBadHeader},
		{"wrong dtype", rawFile(t, `{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}`, make([]byte, 1)), `"Q4"`, ErrDType},
		{"overlap", rawFile(t, `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, make([]byte, 8)), "overlap", ErrBadHeader},
		{"negative dim", rawFile(t, `{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}`, nil), "dimension", ErrBadHeader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := OpenSafetensors(tc.path)
			if err == nil {
				f.Close()
				t.Fatal("no error")
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
}

// writeLen writes a file whose header size field claims n bytes but holds only "{}".
func writeLen(t *testing.T, n uint64) string {
	t.Helper()
	b := binary.LittleEndian.AppendUint64(nil, n)
	b = append(b, "{}"...)
	p := filepath.Join(t.TempDir(), "len.safetensors")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// copyModel copies a tiny model's config and rewrites its weights through fn.
func copyModel(t *testing.T, src string, cfgEdit func(string) string, fn func([]Tensor) []Tensor) string {
	t.Helper()
	dir := t.TempDir()
	cfg, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(cfg)
	if cfgEdit != nil {
		s = cfgEdit(s)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	ts, _, err := ReadSafetensors(filepath.Join(src, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	if fn != nil {
		ts = fn(ts)
	}
	if ts != nil {
		if err := WriteSafetensors(filepath.Join(dir, "model.safetensors"), ts, nil); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestLoadErrors(t *testing.T) {
	src := testdataDir + "/models/ouro-tiny-random"
	drop := func(name string) func([]Tensor) []Tensor {
		return func(ts []Tensor) []Tensor {
			var out []Tensor
			for _, x := range ts {
				if x.Name != name {
					out = append(out, x)
				}
			}
			return out
		}
	}
	for _, tc := range []struct {
		name string
		dir  string
		want error
		msg  string
	}{
		{"model type", copyModel(t, src, func(s string) string { return strings.Replace(s, `"ouro"`, `"llama"`, 1) }, nil), ErrConfig, `model_type "llama"`},
		{"missing field", copyModel(t, src, func(s string) string { return strings.Replace(s, `"total_ut_steps"`, `"x"`, 1) }, nil), ErrConfig, `missing field "total_ut_steps"`},
		{"missing tensor", copyModel(t, src, nil, drop("model.norm.weight")), ErrMissingTensor, `"model.norm.weight"`},
		{"extra tensor", copyModel(t, src, nil, func(ts []Tensor) []Tensor {
			return append(ts, F32Tensor("model.layers.9.extra", []int{1}, []float32{1}))
		}), ErrUnexpectedTensor, "model.layers.9.extra"},
		{"shape", copyModel(t, src, func(s string) string {
			return strings.Replace(s, `"intermediate_size": 160`, `"intermediate_size": 128`, 1)
		}, nil), ErrShape, "expected shape [64 128], found [64 160]"},
		{"dtype", copyModel(t, src, nil, func(ts []Tensor) []Tensor {
			for i := range ts {
				if ts[i].Name == "model.norm.weight" {
					ts[i] = I64Tensor(ts[i].Name, []int{64}, make([]int64, 64))
				}
			}
			return ts
		}), ErrDType, "found I64"},
		{"no weights", copyModel(t, src, nil, func([]Tensor) []Tensor { return nil }), os.ErrNotExist, "model.safetensors"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Load(tc.dir)
			if err == nil {
				m.Close()
				t.Fatal("no error")
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
}

func TestLoadShardedAndF32F16(t *testing.T) {
	src := testdataDir + "/models/ouro-tiny-random"
	ref, err := Load(src)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	dir := copyModel(t, src, nil, func([]Tensor) []Tensor { return nil })
	ts, _, err := ReadSafetensors(filepath.Join(src, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	// Shard 1 in F32, shard 2 in F16 (values are bf16, most fit f16 exactly at this scale).
	var a, b []Tensor
	weightMap := map[string]string{}
	for i, x := range ts {
		v, _ := x.Float32()
		if i%2 == 0 {
			a = append(a, F32Tensor(x.Name, x.Shape, v))
			weightMap[x.Name] = "model-00001-of-00002.safetensors"
		} else {
			b = append(b, f16Tensor(x.Name, x.Shape, v))
			weightMap[x.Name] = "model-00002-of-00002.safetensors"
		}
	}
	if err := WriteSafetensors(filepath.Join(dir, "model-00001-of-00002.safetensors"), a, nil); err != nil {
		t.Fatal(err)
	}
	if err := WriteSafetensors(filepath.Join(dir, "model-00002-of-00002.safetensors"), b, nil); err != nil {
		t.Fatal(err)
	}
	idx := `{"metadata":{},"weight_map":{`
	first := true
	for n, f := range weightMap {
		if !first {
			idx += ","
		}
		first = false
		idx += `"` + n + `":"` + f + `"`
	}
	idx += "}}"
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(idx), 0o644); err != nil {
		t.Fatal(err)
	}
	var calls int
	m, err := LoadProgress(dir, func(Progress) { calls++ })
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if calls == 0 {
		t.Error("no progress reported")
	}
	for _, pair := range [][2]*Matrix{{&m.Embed, &ref.Embed}, {&m.Layers[1].Up, &ref.Layers[1].Up}, {&m.LMHead, &ref.LMHead}} {
		got := make([]float32, pair[0].Cols)
		want := make([]float32, pair[1].Cols)
		for r := 0; r < pair[0].Rows; r += 7 {
			pair[0].Row(r, got)
			pair[1].Row(r, want)
			for j := range got {
				if d := got[j] - want[j]; d > 1e-3*abs(want[j])+1e-7 || -d > 1e-3*abs(want[j])+1e-7 {
					t.Fatalf("%s[%d,%d] = %g, want %g", pair[0].Name, r, j, got[j], want[j])
				}
			}
		}
	}
}

func abs(x float32) float32 {
	if x < 0 {
		return -x
	}
	return x
}

// f16Tensor rounds values to IEEE half precision (truncating; the test tolerates it).
func f16Tensor(name string, shape []int, v []float32) Tensor {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], f32ToF16(x))
	}
	return Tensor{Name: name, DType: F16, Shape: shape, Data: b}
}

func f32ToF16(f float32) uint16 {
	bits := mathBits(f)
	sign := uint16(bits>>16) & 0x8000
	exp := int(bits>>23&0xff) - 127 + 15
	mant := bits & 0x7fffff
	switch {
	case exp <= 0:
		if exp < -10 {
			return sign
		}
		mant |= 0x800000
		return sign | uint16(mant>>uint(14-exp))
	case exp >= 0x1f:
		return sign | 0x7c00
	}
	return sign | uint16(exp)<<10 | uint16(mant>>13)
}

func mathBits(f float32) uint32 { return math.Float32bits(f) }

func TestIndexErrors(t *testing.T) {
	src := testdataDir + "/models/ouro-tiny-random"
	for _, tc := range []struct {
		name, index string
		want        error
		msg         string
	}{
		{"bad json", `{"weight_map":`, ErrIndex, "model.safetensors.index.json"},
		{"empty map", `{"weight_map":{}}`, ErrIndex, "empty weight_map"},
		{"path escape", `{"weight_map":{"model.norm.weight":"../x.safetensors"}}`, ErrIndex, `"../x.safetensors"`},
		{"missing shard", `{"weight_map":{"model.norm.weight":"model-00009.safetensors"}}`, os.ErrNotExist, "model-00009.safetensors"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyModel(t, src, nil, func([]Tensor) []Tensor { return nil })
			if err := os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(tc.index), 0o644); err != nil {
				t.Fatal(err)
			}
			m, err := Load(dir)
			if err == nil {
				m.Close()
				t.Fatal("no error")
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
}
