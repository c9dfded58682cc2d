// Command mkmodel writes a random bf16 Ouro checkpoint of a given layout (a folder holding a
// config.json, e.g. testdata/models/ouro-1.4b-layout) for benchmarks: config.json copied and a
// model.safetensors of deterministic pseudo-random weights (normal, std initializer_range; norm
// weights 1; gate bias 0). The output is large (2.9 GB for Ouro-1.4B) and never committed.
//
//	go run ./hack/mkmodel --layout testdata/models/ouro-1.4b-layout [--out DIR] [--seed N] [--force]
//
// Weights are streamed to disk tensor by tensor, so memory use stays small whatever the model
// size. No tokenizer is written: benchmarks feed token ids.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/loopserve/loopserve/internal/progress"
	"github.com/loopserve/loopserve/internal/randmodel"
)

// generate is randmodel.Write (the tests call it by this name).
var generate = randmodel.Write

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkmodel:", err)
		os.Exit(1)
	}
}

func defaultOut() string {
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			home = os.TempDir()
		}
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "loopserve", "models", "ouro-1.4b-random")
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("mkmodel", flag.ContinueOnError)
	fs.SetOutput(stderr)
	layout := fs.String("layout", "testdata/models/ouro-1.4b-layout", "folder whose config.json gives the model's shape")
	out := fs.String("out", defaultOut(), "output folder")
	seed := fs.Uint64("seed", 1, "random seed (the same seed writes the same bytes)")
	force := fs.Bool("force", false, "rewrite an existing model.safetensors")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dst := filepath.Join(*out, "model.safetensors")
	if _, err := os.Stat(dst); err == nil && !*force {
		fmt.Fprintf(stderr, "%s exists (use --force to rewrite)\n", dst)
		return nil
	}
	r := progress.New(stderr, "writing "+dst, 0)
	if err := generate(ctx, *layout, *out, *seed, r.Update); err != nil {
		return err
	}
	r.Done()
	fmt.Fprintln(stderr, "wrote", *out)
	return nil
}
