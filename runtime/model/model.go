package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
)

// Matrix is a row-major weight matrix [Rows, Cols] held either as bfloat16 bits (BF16, the
// checkpoint's own bytes: half the memory traffic of float32) or as float32 (F32). Exactly one
// of BF16 and F32 is set. It is read-only and safe for concurrent use.
type Matrix struct {
	Name       string
	Rows, Cols int
	BF16       []uint16  // [Rows, Cols], or nil
	F32        []float32 // [Rows, Cols], or nil
}

// Row widens row i into dst[:Cols].
func (m *Matrix) Row(i int, dst []float32) {
	if m.BF16 != nil {
		src := m.BF16[i*m.Cols : (i+1)*m.Cols]
		for j, b := range src {
			dst[j] = BF16ToF32(b)
		}
		return
	}
	copy(dst[:m.Cols], m.F32[i*m.Cols:(i+1)*m.Cols])
}

// Layer holds one decoder layer's weights.
type Layer struct {
	InputNorm, InputNorm2, PostAttnNorm, PostAttnNorm2 []float32 // [hidden]
	Q, K, V, O                                         Matrix    // [qDim, hidden], [kvDim, hidden] ×2, [hidden, qDim]
	Gate, Up, Down                                     Matrix    // [inter, hidden] ×2, [hidden, inter]
}

// Model is a loaded Ouro checkpoint. Its weights alias the mapped files until Close; it is
// read-only after Load and safe for concurrent use.
type Model struct {
	Dir    string
	Config Config
	Embed  Matrix    // [vocab, hidden]
	LMHead Matrix    // [vocab, hidden] (the embedding when tied)
	Norm   []float32 // [hidden]
	ExitW  []float32 // [hidden]
	ExitB  float32
	Layers []Layer
	files  []*File
	closed bool
}

// Progress reports loading: Done of Total weight bytes checked, the file being read.
type Progress struct {
	File        string
	Done, Total int64
}

// Load opens the checkpoint in dir: config.json plus model.safetensors, or the shards named by
// model.safetensors.index.json.
func Load(dir string) (*Model, error) { return LoadProgress(dir, nil) }

// LoadProgress is Load, calling progress (when non-nil) as weight files are read.
func LoadProgress(dir string, progress func(Progress)) (*Model, error) {
	cfg, err := LoadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	paths, err := shardPaths(dir)
	if err != nil {
		return nil, err
	}
	m := &Model{Dir: dir, Config: cfg}
	where := map[string]*File{}
	for _, p := range paths {
		f, err := OpenSafetensors(p)
		if err != nil {
			_ = m.Close()
			return nil, err
		}
		m.files = append(m.files, f)
		for _, n := range f.order {
			if prev, dup := where[n]; dup {
				_ = m.Close()
				return nil, fmt.Errorf("tensor %q in both %s and %s: %w", n, prev.Path, p, ErrUnexpectedTensor)
			}
			where[n] = f
		}
	}
	if err := m.bind(where, progress); err != nil {
		_ = m.Close()
		return nil, err
	}
	return m, nil
}

func shardPaths(dir string) ([]string, error) {
	idxPath := filepath.Join(dir, "model.safetensors.index.json")
	b, err := os.ReadFile(idxPath)
	if errors.Is(err, fs.ErrNotExist) {
		return []string{filepath.Join(dir, "model.safetensors")}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading index: %w", err)
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("%s: %w: %w", idxPath, ErrIndex, err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("%s: %w: empty weight_map", idxPath, ErrIndex)
	}
	seen := map[string]bool{}
	var out []string
	for name, file := range idx.WeightMap {
		if file == "" || filepath.IsAbs(file) || strings.Contains(file, "..") || strings.ContainsRune(file, filepath.Separator) {
			return nil, fmt.Errorf("%s: %w: tensor %q maps to %q", idxPath, ErrIndex, name, file)
		}
		if !seen[file] {
			seen[file] = true
			out = append(out, filepath.Join(dir, file))
		}
	}
	sort.Strings(out)
	return out, nil
}

// TensorNames lists the tensor names an Ouro checkpoint with this config must hold.
func (c Config) TensorNames() map[string][]int {
	h, q, kv, in, v := c.HiddenSize, c.QDim(), c.KVDim(), c.IntermediateSize, c.VocabSize
	want := map[string][]int{
		"model.embed_tokens.weight":    {v, h},
		"model.norm.weight":            {h},
		"model.early_exit_gate.weight": {1, h},
		"model.early_exit_gate.bias":   {1},
	}
	if !c.TieWordEmbeddings {
		want["lm_head.weight"] = []int{v, h}
	}
	for l := 0; l < c.NumHiddenLayers; l++ {
		p := fmt.Sprintf("model.layers.%d.", l)
		for _, n := range []string{"input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"} {
			want[p+n+".weight"] = []int{h}
		}
		want[p+"self_attn.q_proj.weight"] = []int{q, h}
		want[p+"self_attn.k_proj.weight"] = []int{kv, h}
		want[p+"self_attn.v_proj.weight"] = []int{kv, h}
		want[p+"self_attn.o_proj.weight"] = []int{h, q}
		want[p+"mlp.gate_proj.weight"] = []int{in, h}
		want[p+"mlp.up_proj.weight"] = []int{in, h}
		want[p+"mlp.down_proj.weight"] = []int{h, in}
	}
	return want
}

func (m *Model) bind(where map[string]*File, progress func(Progress)) error {
	want := m.Config.TensorNames()
	var missing, extra []string
	for n := range want {
		if where[n] == nil {
			missing = append(missing, n)
		}
	}
	for n, f := range where {
		if _, ok := want[n]; !ok {
			// Tied checkpoints sometimes still carry lm_head, and older exports the RoPE
			// frequency buffers (recomputed from rope_theta); anything else is a mismatch.
			if n == "lm_head.weight" && m.Config.TieWordEmbeddings || strings.HasSuffix(n, "rotary_emb.inv_freq") {
				continue
			}
			extra = append(extra, f.Path+": "+n)
		}
	}
	sort.Strings(missing)
	sort.Strings(extra)
	if len(missing) > 0 {
		return fmt.Errorf("%s: %d of %d tensors absent, first %q: %w", m.Dir, len(missing), len(want), missing[0], ErrMissingTensor)
	}
	if len(extra) > 0 {
		return fmt.Errorf("%s: %d tensors not in an Ouro model, first %s: %w", m.Dir, len(extra), extra[0], ErrUnexpectedTensor)
	}
	var total, done int64
	for n := range want {
		in, _ := where[n].Info(n)
		total += in.End - in.Begin
	}
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	// File order, so the page touching below reads each file front to back.
	sort.Slice(names, func(i, j int) bool {
		fi, fj := where[names[i]], where[names[j]]
		if fi.Path != fj.Path {
			return fi.Path < fj.Path
		}
		a, _ := fi.Info(names[i])
		b, _ := fj.Info(names[j])
		return a.Begin < b.Begin
	})
	get := map[string]Tensor{}
	for _, n := range names {
		f := where[n]
		t, err := f.Tensor(n)
		if err != nil {
			return err
		}
		if !slices.Equal(t.Shape, want[n]) {
			return fmt.Errorf("%s: tensor %q: expected shape %v, found %v: %w", f.Path, n, want[n], t.Shape, ErrShape)
		}
		if t.DType != F32 && t.DType != BF16 && t.DType != F16 {
			return fmt.Errorf("%s: tensor %q: expected F32, BF16 or F16, found %s: %w", f.Path, n, t.DType, ErrDType)
		}
		// Touch every page now so a short read (a file truncated on a network volume)
		// fails here rather than in the middle of a request, and progress is real.
		var sink byte
		for i := 0; i < len(t.Data); i += 4096 {
			sink ^= t.Data[i]
			if progress != nil && i > 0 && i%(32<<20) == 0 {
				progress(Progress{File: f.Path, Done: done + int64(i), Total: total})
			}
		}
		pageSink.Add(uint32(sink)) // a global store, so the reads are not optimised away
		done += int64(len(t.Data))
		if progress != nil {
			progress(Progress{File: f.Path, Done: done, Total: total})
		}
		get[n] = t
	}
	var err error
	vec := func(n string) []float32 {
		if err != nil {
			return nil
		}
		var v []float32
		v, err = get[n].Float32()
		return v
	}
	mat := func(n string) Matrix {
		t := get[n]
		mx := Matrix{Name: n, Rows: t.Shape[0], Cols: t.Shape[1]}
		switch t.DType {
		case BF16:
			mx.BF16 = alignedU16(t.Data)
		case F32:
			mx.F32 = alignedF32(t.Data)
		default:
			if err == nil {
				mx.F32, err = t.Float32()
			}
		}
		return mx
	}
	c := m.Config
	m.Embed = mat("model.embed_tokens.weight")
	if c.TieWordEmbeddings {
		m.LMHead = m.Embed
	} else {
		m.LMHead = mat("lm_head.weight")
	}
	m.Norm = vec("model.norm.weight")
	m.ExitW = vec("model.early_exit_gate.weight")
	if b := vec("model.early_exit_gate.bias"); len(b) == 1 {
		m.ExitB = b[0]
	}
	m.Layers = make([]Layer, c.NumHiddenLayers)
	for l := range m.Layers {
		p := fmt.Sprintf("model.layers.%d.", l)
		m.Layers[l] = Layer{
			InputNorm:     vec(p + "input_layernorm.weight"),
			InputNorm2:    vec(p + "input_layernorm_2.weight"),
			PostAttnNorm:  vec(p + "post_attention_layernorm.weight"),
			PostAttnNorm2: vec(p + "post_attention_layernorm_2.weight"),
			Q:             mat(p + "self_attn.q_proj.weight"),
			K:             mat(p + "self_attn.k_proj.weight"),
			V:             mat(p + "self_attn.v_proj.weight"),
			O:             mat(p + "self_attn.o_proj.weight"),
			Gate:          mat(p + "mlp.gate_proj.weight"),
			Up:            mat(p + "mlp.up_proj.weight"),
			Down:          mat(p + "mlp.down_proj.weight"),
		}
	}
	return err
}

// pageSink receives the bytes read to fault weight pages in.
var pageSink atomic.Uint32

// Close releases the mapped files; the Model must not be used afterwards. It is idempotent.
func (m *Model) Close() error {
	if m.closed {
		return nil
	}
	m.closed = true
	var errs []error
	for _, f := range m.files {
		if err := f.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	m.files = nil
	return errors.Join(errs...)
}
