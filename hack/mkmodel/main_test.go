package main

import (
	"bytes"
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

const testdata = "../../testdata"

func TestGenerateLoadsAndIsDeterministic(t *testing.T) {
	layout := filepath.Join(testdata, "models", "ouro-tiny-random")
	a, b := t.TempDir(), t.TempDir()
	var last, total int64
	if err := generate(context.Background(), layout, a, 7, func(d, tt int64) { last, total = d, tt }); err != nil {
		t.Fatal(err)
	}
	if last != total || total == 0 {
		t.Errorf("progress ended at %d of %d bytes, want all of a positive total", last, total)
	}
	if err := generate(context.Background(), layout, b, 7, nil); err != nil {
		t.Fatal(err)
	}
	wa, err := os.ReadFile(filepath.Join(a, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	wb, err := os.ReadFile(filepath.Join(b, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(wa, wb) {
		t.Error("two runs with the same seed wrote different weights")
	}

	m, err := model.Load(a)
	if err != nil {
		t.Fatalf("loading the generated model: %v", err)
	}
	defer m.Close()
	ref, err := model.LoadConfig(filepath.Join(layout, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.HiddenSize != ref.HiddenSize || len(m.Layers) != ref.NumHiddenLayers || m.Embed.Rows != ref.VocabSize {
		t.Errorf("generated model: hidden %d, %d layers, vocab %d; want %d, %d, %d",
			m.Config.HiddenSize, len(m.Layers), m.Embed.Rows, ref.HiddenSize, ref.NumHiddenLayers, ref.VocabSize)
	}
	if m.Layers[0].Q.BF16 == nil {
		t.Error("generated weights are not bf16")
	}
	for _, v := range m.Layers[1].PostAttnNorm2 {
		if v != 1 {
			t.Fatalf("norm weight %v, want 1", v)
		}
	}
	if m.ExitB != 0 {
		t.Errorf("gate bias %v, want 0", m.ExitB)
	}
	// Normal(0, 0.02): the sample std of thousands of values is within a few percent.
	var sum, sq float64
	w := m.Layers[0].Gate.BF16
	for _, u := range w {
		v := float64(model.BF16ToF32(u))
		sum += v
		sq += v * v
	}
	n := float64(len(w))
	mean, std := sum/n, math.Sqrt(sq/n-(sum/n)*(sum/n))
	if math.Abs(mean) > 0.002 || math.Abs(std-0.02) > 0.002 {
		t.Errorf("gate_proj mean %.4f std %.4f, want about 0 and 0.02", mean, std)
	}
}

func TestGenerateOtherSeedDiffers(t *testing.T) {
	layout := filepath.Join(testdata, "models", "ouro-tiny-random")
	a, b := t.TempDir(), t.TempDir()
	for seed, dir := range map[uint64]string{1: a, 2: b} {
		if err := generate(context.Background(), layout, dir, seed, nil); err != nil {
			t.Fatal(err)
		}
	}
	wa, _ := os.ReadFile(filepath.Join(a, "model.safetensors"))
	wb, _ := os.ReadFile(filepath.Join(b, "model.safetensors"))
	if len(wa) == 0 || bytes.Equal(wa, wb) {
		t.Error("different seeds wrote the same weights")
	}
}

func TestRunSkipsExistingAndRejectsBadLayout(t *testing.T) {
	out := t.TempDir()
	var log bytes.Buffer
	if err := run(context.Background(), []string{"--layout", t.TempDir(), "--out", out}, &log); err == nil {
		t.Error("run with a layout lacking config.json returned no error")
	}
	if err := os.WriteFile(filepath.Join(out, "model.safetensors"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	log.Reset()
	if err := run(context.Background(), []string{"--layout", filepath.Join(testdata, "models", "ouro-tiny-random"), "--out", out}, &log); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(out, "model.safetensors")); string(got) != "x" {
		t.Error("run without --force rewrote an existing model")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := generate(ctx, filepath.Join(testdata, "models", "ouro-tiny-random"), t.TempDir(), 1, nil); err == nil {
		t.Error("generate with a cancelled context returned no error")
	}
}
