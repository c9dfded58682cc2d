package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// GenerationConfig is the part of a checkpoint's generation_config.json the runtime uses. The
// zero value (no file) adds nothing to config.json.
type GenerationConfig struct {
	// EOSTokenIDs are the ids that end generation: Hugging Face and vLLM stop at every one of
	// them, and checkpoints often list more here than config.json's single eos_token_id.
	EOSTokenIDs []int
}

// LoadGenerationConfig reads dir/generation_config.json; a missing file is the zero value.
// eos_token_id may be one id or a list of ids.
func LoadGenerationConfig(dir string) (GenerationConfig, error) {
	path := filepath.Join(dir, "generation_config.json")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return GenerationConfig{}, nil
	}
	if err != nil {
		return GenerationConfig{}, fmt.Errorf("reading generation config: %w", err)
	}
	var raw struct {
		EOS json.RawMessage `json:"eos_token_id"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return GenerationConfig{}, fmt.Errorf("generation config %s: %w: %w", path, ErrConfig, err)
	}
	var g GenerationConfig
	switch {
	case len(raw.EOS) == 0 || string(raw.EOS) == "null":
	case raw.EOS[0] == '[':
		if err := json.Unmarshal(raw.EOS, &g.EOSTokenIDs); err != nil {
			return GenerationConfig{}, fmt.Errorf("generation config %s: %w: eos_token_id: %w", path, ErrConfig, err)
		}
	default:
		var id int
		if err := json.Unmarshal(raw.EOS, &id); err != nil {
			return GenerationConfig{}, fmt.Errorf("generation config %s: %w: eos_token_id: %w", path, ErrConfig, err)
		}
		g.EOSTokenIDs = []int{id}
	}
	for _, id := range g.EOSTokenIDs {
		if id < 0 {
			return GenerationConfig{}, fmt.Errorf("generation config %s: %w: eos_token_id %d is negative", path, ErrConfig, id)
		}
	}
	return g, nil
}
