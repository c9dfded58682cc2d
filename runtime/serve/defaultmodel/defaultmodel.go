// Package defaultmodel embeds loopserve's default model, ouro-tiny-arith (3.5M parameters,
// bf16, 7 MB; testdata/README.md says where it came from), so that `loopserve up` serves something from any
// directory. This folder holds the one copy in the repository (go:embed cannot reach outside the
// package); testdata/models/ouro-tiny-arith is a symbolic link to it.
package defaultmodel

import (
	"embed"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Name is the default model's name, also its LoopModel name under `loopserve up`.
const Name = "ouro-tiny-arith"

//go:embed ouro-tiny-arith
var files embed.FS

// FS returns the model directory's files (config.json, model.safetensors, tokenizer.json, ...).
func FS() fs.FS {
	sub, _ := fs.Sub(files, Name)
	return sub
}

// Extract writes the model's files into dir (created if needed), where the model and tokenizer
// loaders can open them.
func Extract(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("extracting the default model: %w", err)
	}
	return fs.WalkDir(FS(), ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(FS(), path)
		if err != nil {
			return fmt.Errorf("extracting the default model: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, path), b, 0o644); err != nil {
			return fmt.Errorf("extracting the default model: %w", err)
		}
		return nil
	})
}
