package serve

import (
	"context"
	"errors"
	"fmt"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
	"github.com/loopserve/loopserve/runtime/tokenizer"
)

// Loaded is a model ready to serve: its engine, tokenizer and the worker settings they imply.
// Create it with Load; run Engine.Run for the batching loop and Close when done.
type Loaded struct {
	Engine *engine.Engine
	Tok    Tokenizer
	// Worker carries ContextLength, MaxSteps, VocabSize and StopTokens (the eos ids of
	// tokenizer_config.json, config.json and generation_config.json) from the model; set the
	// rest (Ref, Capacity, ...) before use.
	Worker WorkerOptions
	model  *model.Model
}

// Load opens the Hugging Face model directory dir (config.json, safetensors, tokenizer.json)
// and builds its engine. opts.Backend defaults to the CPU backend, opts.Decode to the
// tokenizer's, and opts.Mode should be engine.Fast to save compute on early exits.
func Load(dir string, opts engine.Options) (*Loaded, error) { return LoadProgress(dir, opts, nil) }

// LoadProgress is Load reporting the weights' loading progress to progress (nil: none).
func LoadProgress(dir string, opts engine.Options, progress func(model.Progress)) (*Loaded, error) {
	tok, err := tokenizer.LoadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("loading tokenizer from %s: %w", dir, err)
	}
	gen, err := model.LoadGenerationConfig(dir)
	if err != nil {
		return nil, err
	}
	m, err := model.LoadProgress(dir, progress)
	if err != nil {
		return nil, fmt.Errorf("loading model %s: %w", dir, err)
	}
	if opts.Backend == nil {
		opts.Backend = cpu.New(0)
	}
	if opts.Decode == nil {
		opts.Decode = tok.Decode
	}
	e, err := engine.New(m, opts)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("starting engine for %s: %w", dir, err), m.Close())
	}
	cfg := e.Config()
	l := &Loaded{Engine: e, Tok: FromTokenizer(tok), model: m}
	l.Worker.ContextLength = cfg.MaxPositionEmbeddings
	if opts.MaxContext > 0 {
		l.Worker.ContextLength = opts.MaxContext
	}
	if l.Worker.ContextLength <= 0 {
		l.Worker.ContextLength = 2048
	}
	l.Worker.MaxSteps = cfg.TotalUTSteps
	l.Worker.VocabSize = cfg.VocabSize
	if id, ok := tok.EOS(); ok {
		l.Worker.StopTokens = append(l.Worker.StopTokens, id)
	}
	if cfg.EOSTokenID != nil && !isStop(*cfg.EOSTokenID, l.Worker.StopTokens) {
		l.Worker.StopTokens = append(l.Worker.StopTokens, *cfg.EOSTokenID)
	}
	for _, id := range gen.EOSTokenIDs {
		if !isStop(id, l.Worker.StopTokens) {
			l.Worker.StopTokens = append(l.Worker.StopTokens, id)
		}
	}
	return l, nil
}

// Run runs the engine's batching loop until ctx ends.
func (l *Loaded) Run(ctx context.Context) error { return l.Engine.Run(ctx) }

// Close releases the engine's backend copy of the model and the mapped weights; call it after
// Run returned.
func (l *Loaded) Close() error { return errors.Join(l.Engine.Close(), l.model.Close()) }
