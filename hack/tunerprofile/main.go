// Command tunerprofile measures the depth profile the tuner simulator draws from: it decodes
// seeded arithmetic prompts with the shipped ouro-tiny-arith model on the real engine, every
// token a probe (all loop steps run, each step's argmax compared with the full-depth one), and
// records each token's cumulative exit probabilities c_t and agreement bits, plus the engine's
// loop-step cost at batch 1 and 8 on this machine. It writes gatepolicy/sim/profile.json:
//
//	go run ./hack/tunerprofile -out gatepolicy/sim/profile.json
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"

	"github.com/loopserve/loopserve/bench"
	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
	"github.com/loopserve/loopserve/runtime/tokenizer"
)

type profile struct {
	Model    string `json:"model"`
	Note     string `json:"note"`
	MaxSteps int    `json:"maxSteps"`
	// StepSeconds is t0 + t1·rows: one batch iteration's wall time (one loop step for every row).
	StepBase   float64 `json:"stepBaseSeconds"`
	StepPerRow float64 `json:"stepPerRowSeconds"`
	// Tokens: c_t ×1000 per step, and a bit per step set when that step's argmax equals the
	// full-depth argmax.
	Cum   [][]int `json:"cum"`
	Agree []int   `json:"agree"`
}

func main() {
	dir := flag.String("model", "testdata/models/ouro-tiny-arith", "model folder")
	out := flag.String("out", "gatepolicy/sim/profile.json", "profile to write")
	n := flag.Int("prompts", 400, "prompts to decode")
	flag.Parse()
	if err := run(*dir, *out, *n); err != nil {
		fmt.Fprintln(os.Stderr, "tunerprofile:", err)
		os.Exit(1)
	}
}

func prompt(rng *rand.Rand) string {
	vars := []string{"a", "b", "c", "n", "x", "y"}
	v := rng.Perm(len(vars))
	a, b := rng.IntN(10), rng.IntN(10)
	switch rng.IntN(3) {
	case 0:
		return fmt.Sprintf("%s = %d ; ? %s =", vars[v[0]], a, vars[v[0]])
	case 1:
		return fmt.Sprintf("%s = %d ; %s = %s + %d ; ? %s =", vars[v[0]], a, vars[v[1]], vars[v[0]], b, vars[v[1]])
	default:
		return fmt.Sprintf("%s = %d ; %s = %s + %d ; %s = %d ; ? %s =", vars[v[0]], a, vars[v[1]], vars[v[0]], b, vars[v[2]], rng.IntN(10), vars[v[1]])
	}
}

func run(dir, out string, n int) error {
	m, err := model.Load(dir)
	if err != nil {
		return fmt.Errorf("loading %s: %w", dir, err)
	}
	defer m.Close()
	tok, err := tokenizer.Load(dir + "/tokenizer.json")
	if err != nil {
		return fmt.Errorf("loading tokenizer: %w", err)
	}
	e, err := engine.New(m, engine.Options{Backend: cpu.New(1), Mode: engine.Fast, Threshold: 1, ProbeFraction: 1})
	if err != nil {
		return err
	}
	defer e.Close()
	p := profile{Model: "ouro-tiny-arith", MaxSteps: m.Config.TotalUTSteps,
		Note: "every token a probe: c_t after each loop step and agreement with the full-depth argmax; step cost measured on the machine that wrote it"}
	rng := rand.New(rand.NewPCG(8, 8))
	for range n {
		ids := tok.Encode(prompt(rng))
		_, err := e.Generate(context.Background(), engine.Request{Prompt: ids, MaxTokens: 6, IgnoreEOS: true}, func(t engine.Token) bool {
			if len(t.Cum) < p.MaxSteps || len(t.Agree) < p.MaxSteps {
				return true
			}
			c := make([]int, p.MaxSteps)
			bits := 0
			for i := range p.MaxSteps {
				c[i] = int(math.Round(float64(t.Cum[i]) * 1000))
				if t.Agree[i] {
					bits |= 1 << i
				}
			}
			p.Cum = append(p.Cum, c)
			p.Agree = append(p.Agree, bits)
			return true
		})
		if err != nil {
			return err
		}
	}
	if p.StepBase, p.StepPerRow, err = bench.StepCost(context.Background(), m, func() engine.Backend { return cpu.New(1) }); err != nil {
		return err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return os.WriteFile(out, append(b, '\n'), 0o644)
}
