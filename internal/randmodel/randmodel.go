// Package randmodel writes random bf16 Ouro checkpoints of a given layout for benchmarks:
// config.json copied and a model.safetensors of deterministic pseudo-random weights (normal,
// std initializer_range; norm weights 1; gate bias 0), streamed tensor by tensor so memory use
// stays small whatever the model size. hack/mkmodel and "loopserve bench mkmodel" use it.
package randmodel

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/loopserve/loopserve/runtime/model"
)

// Write writes out/config.json (a copy of layout/config.json) and out/model.safetensors.
// The file appears under its final name only when complete.
func Write(ctx context.Context, layout, out string, seed uint64, progress func(done, total int64)) error {
	raw, err := os.ReadFile(filepath.Join(layout, "config.json"))
	if err != nil {
		return fmt.Errorf("reading layout: %w", err)
	}
	cfg, err := model.ParseConfig(raw)
	if err != nil {
		return fmt.Errorf("layout %s: %w", layout, err)
	}
	var init struct {
		Range float64 `json:"initializer_range"`
	}
	if err := json.Unmarshal(raw, &init); err != nil {
		return fmt.Errorf("layout %s: %w", layout, err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return fmt.Errorf("creating output folder: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, "config.json"), raw, 0o644); err != nil {
		return fmt.Errorf("writing config: %w", err)
	}
	shapes := cfg.TensorNames()
	names := make([]string, 0, len(shapes))
	for n := range shapes {
		names = append(names, n)
	}
	slices.Sort(names)

	// The header lists tensors with their byte ranges; data follows in the same (sorted) order.
	header := map[string]any{"__metadata__": map[string]string{"format": "pt", "generator": "loopserve mkmodel", "seed": fmt.Sprint(seed)}}
	var total int64
	for _, n := range names {
		size := int64(numel(shapes[n])) * 2
		header[n] = map[string]any{"dtype": "BF16", "shape": shapes[n], "data_offsets": []int64{total, total + size}}
		total += size
	}
	hb, err := json.Marshal(header)
	if err != nil {
		return fmt.Errorf("encoding header: %w", err)
	}
	for len(hb)%8 != 0 {
		hb = append(hb, ' ')
	}

	dst := filepath.Join(out, "model.safetensors")
	tmp, err := os.CreateTemp(out, ".model.safetensors.*")
	if err != nil {
		return fmt.Errorf("writing weights: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	w := bufio.NewWriterSize(tmp, 4<<20)
	err = writeData(ctx, w, hb, names, shapes, init.Range, seed, total, progress)
	if err == nil {
		err = w.Flush()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", dst, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("writing weights: %w", err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("writing weights: %w", err)
	}
	return nil
}

func numel(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// chunk is the number of elements one worker fills at a time; each chunk has its own random
// stream (seed, tensor, chunk) so the bytes do not depend on the number of workers.
const chunk = 1 << 20

func writeData(ctx context.Context, w io.Writer, header []byte, names []string, shapes map[string][]int,
	std float64, seed uint64, total int64, progress func(done, total int64)) error {
	if std <= 0 {
		std = 0.02
	}
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(header)))
	if _, err := w.Write(n[:]); err != nil {
		return err
	}
	if _, err := w.Write(header); err != nil {
		return err
	}
	workers := runtime.GOMAXPROCS(0)
	bufs := make([][]byte, workers)
	for i := range bufs {
		bufs[i] = make([]byte, 2*chunk)
	}
	var done int64
	for ti, name := range names {
		fill := fillFor(name, std)
		count := numel(shapes[name])
		chunks := (count + chunk - 1) / chunk
		for c0 := 0; c0 < chunks; c0 += workers {
			if err := ctx.Err(); err != nil {
				return err
			}
			batch := min(workers, chunks-c0)
			var wg sync.WaitGroup
			for i := range batch {
				c := c0 + i
				elems := min(chunk, count-c*chunk)
				wg.Go(func() {
					r := rand.New(rand.NewPCG(seed, uint64(ti)<<32|uint64(c)))
					fill(r, bufs[i][:2*elems])
				})
			}
			wg.Wait()
			for i := range batch {
				elems := min(chunk, count-(c0+i)*chunk)
				if _, err := w.Write(bufs[i][:2*elems]); err != nil {
					return err
				}
				done += int64(2 * elems)
			}
			if progress != nil {
				progress(done, total)
			}
		}
	}
	if done != total {
		return errors.New("internal error: wrote a different size than the header declares")
	}
	return nil
}

// fillFor picks a tensor's values: ones for RMSNorm weights (their initialisation), zero for
// the gate bias, and normal(0, std) bf16 otherwise.
func fillFor(name string, std float64) func(r *rand.Rand, dst []byte) {
	constant := func(v float32) func(*rand.Rand, []byte) {
		b := model.F32ToBF16(v)
		return func(_ *rand.Rand, dst []byte) {
			for i := 0; i+1 < len(dst); i += 2 {
				binary.LittleEndian.PutUint16(dst[i:], b)
			}
		}
	}
	switch {
	case strings.HasSuffix(name, "norm.weight") || strings.HasSuffix(name, "layernorm.weight") || strings.HasSuffix(name, "layernorm_2.weight"):
		return constant(1)
	case name == "model.early_exit_gate.bias":
		return constant(0)
	}
	return func(r *rand.Rand, dst []byte) {
		for i := 0; i+1 < len(dst); i += 2 {
			v := float32(r.NormFloat64() * std)
			if math.IsInf(float64(v), 0) {
				v = 0
			}
			binary.LittleEndian.PutUint16(dst[i:], model.F32ToBF16(v))
		}
	}
}
